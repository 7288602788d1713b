package spec

import (
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// entry is one value of the YAML tree with the path validator and lint use
// for it: "incoming.transitions[3].to", "rules[0].when.params.mode".
type entry struct {
	path string
	key  *yaml.Node // the mapping key, nil for sequence items and the root
	val  *yaml.Node
}

// index maps paths of a YAML tree to its nodes, so that an error about a
// decoded field can point at the text that produced it.
type index struct {
	root    *yaml.Node
	entries []entry // document order
	byPath  map[string]int

	// Built by buildLines when a decoder message must be placed.
	keys   map[lineKey][]int
	values map[int][]int
}

func newIndex(root *yaml.Node) *index {
	ix := &index{root: root, byPath: map[string]int{}}
	ix.walk(root, nil, "")
	return ix
}

func (ix *index) walk(n, key *yaml.Node, path string) {
	if n == nil {
		return
	}
	if _, seen := ix.byPath[path]; !seen {
		ix.byPath[path] = len(ix.entries)
	}
	ix.entries = append(ix.entries, entry{path: path, key: key, val: n})
	switch n.Kind {
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			k := n.Content[i]
			p := k.Value
			if path != "" {
				p = path + "." + p
			}
			ix.walk(n.Content[i+1], k, p)
		}
	case yaml.SequenceNode:
		for i, c := range n.Content {
			ix.walk(c, nil, path+"["+strconv.Itoa(i)+"]")
		}
	}
	// Alias nodes are not followed: Load rejects them before indexing, and
	// an alias graph may be cyclic.
}

// pos returns the position of the value at path. A path with no node (a
// missing key) falls back to its closest existing parent: the mapping the
// key is missing from.
func (ix *index) pos(path string) (int, int) {
	for {
		if i, ok := ix.byPath[path]; ok {
			n := ix.entries[i].val
			return n.Line, n.Column
		}
		if path == "" {
			return ix.root.Line, ix.root.Column
		}
		path = parentPath(path)
	}
}

// keyPos returns the position of the key whose value is at path (the value's
// own position for sequence items), falling back like pos.
func (ix *index) keyPos(path string) (int, int) {
	if i, ok := ix.byPath[path]; ok && ix.entries[i].key != nil {
		k := ix.entries[i].key
		return k.Line, k.Column
	}
	return ix.pos(path)
}

// line returns the first line of the value at path, or 0.
func (ix *index) line(path string) int {
	if i, ok := ix.byPath[path]; ok {
		return ix.entries[i].val.Line
	}
	return 0
}

// keysAt returns the entries whose mapping key is name on line, in
// document order. The line tables are built on first use: only a spec with
// decoder errors needs them.
func (ix *index) keysAt(line int, name string) []int {
	ix.buildLines()
	return ix.keys[lineKey{line, name}]
}

// valuesAt returns the entries whose value starts on line.
func (ix *index) valuesAt(line int) []int {
	ix.buildLines()
	return ix.values[line]
}

type lineKey struct {
	line int
	name string
}

func (ix *index) buildLines() {
	if ix.keys != nil {
		return
	}
	ix.keys = map[lineKey][]int{}
	ix.values = map[int][]int{}
	for i, e := range ix.entries {
		if e.key != nil {
			k := lineKey{e.key.Line, e.key.Value}
			ix.keys[k] = append(ix.keys[k], i)
		}
		ix.values[e.val.Line] = append(ix.values[e.val.Line], i)
	}
}

// parentPath strips the last ".name" or "[i]" from a path.
func parentPath(path string) string {
	i := strings.LastIndexAny(path, ".[")
	if i < 0 {
		return ""
	}
	return path[:i]
}

// describePath names a path for a message: the path itself, or "the top
// level" for the root.
func describePath(path string) string {
	if path == "" {
		return "the top level"
	}
	return path
}
