package spec

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"regexp"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Limits on what Load reads. The default spec is about 30 KiB, its largest
// mapping has 10 keys, and it has no errors.
const (
	// MaxSize is the largest spec Load accepts, in bytes.
	MaxSize = 1 << 20
	// MaxMappingKeys bounds the keys of one mapping: the YAML decoder's
	// duplicate-key check is quadratic in it.
	MaxMappingKeys = 1000
	// MaxErrors bounds the errors Load returns; one more entry says how
	// many were left out.
	MaxErrors = 100
)

// LoadFile reads the spec at path and loads it like Load, naming the file
// path in every error. A file that cannot be read gives a plain wrapped
// error (no *Errors).
func LoadFile(path string, guards []string) (*Spec, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("spec: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("spec: read %s: %w", path, err)
	}
	return Load(path, data, guards)
}

// Load decodes and checks a spec. file names the spec in errors (and in
// Spec.File); data is its text. guards lists the guard names the guard
// registry implements: every guard the spec declares must be among them.
// With guards nil that check is skipped (documentation tools, tests of the
// spec alone).
//
// On any problem Load returns a nil *Spec and an *Errors listing every
// problem it found, sorted by position, each as file:line:col: message. A
// YAML syntax error, an anchor or alias, or a value of the wrong kind stops
// the check early (what follows would only be noise); unknown fields,
// validation and graph problems are all reported together.
func Load(file string, data []byte, guards []string) (*Spec, error) {
	l := &loader{file: file}
	s := l.load(data, guards)
	if len(l.errs) > 0 {
		errs := Errors(sortErrors(l.errs))
		if len(errs) > MaxErrors {
			more := errs[MaxErrors]
			more.Msg = fmt.Sprintf("too many errors: %d more from here on are not shown; fix the ones above first", len(errs)-MaxErrors)
			errs = append(errs[:MaxErrors], more)
		}
		return nil, &errs
	}
	s.File = file
	s.rules = s.buildRules()
	s.ix = l.ix
	return s, nil
}

// loader carries one Load: the file name, the position index, the errors.
type loader struct {
	file   string
	ix     *index
	spec   *Spec                 // the spec being checked, once decoded
	names  *nameSets             // what spec declares, once decoded
	params map[string]*Parameter // spec's parameters by name, for lint
	errs   []Error
}

func (l *loader) errorf(line, col int, format string, args ...any) {
	l.errs = append(l.errs, Error{File: l.file, Line: line, Col: col, Msg: fmt.Sprintf(format, args...)})
}

// at reports an error at the value of path (or its closest parent).
func (l *loader) at(path, format string, args ...any) {
	line, col := l.ix.pos(path)
	l.errorf(line, col, format, args...)
}

// atKey reports an error at the key of path.
func (l *loader) atKey(path, format string, args ...any) {
	line, col := l.ix.keyPos(path)
	l.errorf(line, col, format, args...)
}

func (l *loader) load(data []byte, guards []string) *Spec {
	if len(data) > MaxSize {
		l.errorf(1, 1, "the spec is larger than %d bytes; this is not a spec file", MaxSize)
		return nil
	}
	root := l.parse(data)
	if root == nil {
		return nil
	}
	if l.rejectAliases(root); len(l.errs) > 0 {
		return nil
	}
	if l.rejectHugeMappings(root); len(l.errs) > 0 {
		return nil
	}
	l.ix = newIndex(root)
	s := new(Spec)
	if !l.decode(data, s) {
		return nil
	}
	l.validate(s)
	l.lint(s, guards)
	return s
}

// parse reads the one YAML document of data into a node tree, reporting
// syntax errors, an empty file, more than one document and a top level that
// is not a mapping.
func (l *loader) parse(data []byte) *yaml.Node {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			l.errorf(1, 1, "the spec is empty; it needs at least version, guards, capabilities, parameters, transports, incoming and outgoing")
		} else {
			l.yamlError(err)
		}
		return nil
	}
	var extra yaml.Node
	switch err := dec.Decode(&extra); {
	case errors.Is(err, io.EOF):
	case err != nil:
		l.yamlError(err)
		return nil
	default:
		line, col := extra.Line, extra.Column
		if len(extra.Content) > 0 {
			line, col = extra.Content[0].Line, extra.Content[0].Column
		}
		l.errorf(line, col, "a second YAML document starts here; a spec is exactly one document")
		return nil
	}
	if len(doc.Content) == 0 {
		l.errorf(1, 1, "the spec is empty")
		return nil
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		l.errorf(root.Line, root.Column, "the top level of a spec must be a mapping (version:, guards:, capabilities:, ...), not %s", kindName(root))
		return nil
	}
	return root
}

var yamlLineRe = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

// yamlError reports an error of the YAML parser, which gives a line but no
// column.
func (l *loader) yamlError(err error) {
	msg := err.Error()
	if m := yamlLineRe.FindStringSubmatch(msg); m != nil {
		line, _ := strconv.Atoi(m[1])
		l.errorf(line, 1, "YAML syntax: %s", m[2])
		return
	}
	l.errorf(1, 1, "YAML syntax: %s", strings.TrimPrefix(msg, "yaml: "))
}

// rejectAliases reports every anchor and alias. They buy nothing in a spec
// and make it possible to build huge or cyclic documents.
func (l *loader) rejectAliases(n *yaml.Node) {
	if n.Anchor != "" {
		l.errorf(n.Line, n.Column, "anchor &%s: anchors and aliases are not allowed in a spec; write the value out", n.Anchor)
	}
	if n.Kind == yaml.AliasNode {
		l.errorf(n.Line, n.Column, "alias *%s: anchors and aliases are not allowed in a spec; write the value out", n.Value)
		return // never follow: the alias may point at its own parent
	}
	for _, c := range n.Content {
		l.rejectAliases(c)
	}
}

// rejectHugeMappings reports mappings with more than MaxMappingKeys keys
// (no spec has them, and decoding them is slow). Called after
// rejectAliases, so the tree has no cycles.
func (l *loader) rejectHugeMappings(n *yaml.Node) {
	if n.Kind == yaml.MappingNode && len(n.Content)/2 > MaxMappingKeys {
		l.errorf(n.Line, n.Column, "this mapping has %d keys; a spec mapping has at most %d", len(n.Content)/2, MaxMappingKeys)
		return
	}
	for _, c := range n.Content {
		l.rejectHugeMappings(c)
	}
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		if n.ShortTag() == "!!null" {
			return "null"
		}
		return fmt.Sprintf("the scalar %q", n.Value)
	}
	return "an alias"
}

var (
	unknownFieldRe = regexp.MustCompile(`^line (\d+): field (.+) not found in type ([\w.]+)$`)
	duplicateKeyRe = regexp.MustCompile(`^line (\d+): mapping key "(.*)" already defined at line (\d+)$`)
	alreadySetRe   = regexp.MustCompile(`^line (\d+): field (.+) already set in type ([\w.]+)$`)
	cannotDecodeRe = regexp.MustCompile("^line (\\d+): cannot unmarshal (!!\\w+)(?: `(.*)`)? into (.+)$")
	lineRe         = regexp.MustCompile(`^line (\d+): (.*)$`)
)

// decode decodes data into s strictly (unknown fields are errors) and turns
// the decoder's messages, which carry only a line, into positioned errors.
// It reports whether checking may go on: only unknown fields leave s
// complete enough to validate.
func (l *loader) decode(data []byte, s *Spec) bool {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	err := dec.Decode(s)
	if err == nil {
		return true
	}
	var te *yaml.TypeError
	if !errors.As(err, &te) {
		l.yamlError(err)
		return false
	}
	goOn := true
	for _, msg := range te.Errors {
		if m := unknownFieldRe.FindStringSubmatch(msg); m != nil {
			l.unknownField(atoi(m[1]), m[2], m[3])
			continue
		}
		goOn = false
		if m := duplicateKeyRe.FindStringSubmatch(msg); m != nil {
			e := l.findKey(atoi(m[1]), m[2], 1)
			l.errorf(e.line(), e.col(), "duplicate key %q in %s (first at line %s); a key may appear once per mapping", m[2], describePath(parentPath(e.path)), m[3])
			continue
		}
		if m := alreadySetRe.FindStringSubmatch(msg); m != nil {
			e := l.findKey(atoi(m[1]), m[2], 0)
			l.errorf(e.line(), e.col(), "field %q is set twice in %s", m[2], describePath(parentPath(e.path)))
			continue
		}
		if m := cannotDecodeRe.FindStringSubmatch(msg); m != nil {
			l.wrongKind(atoi(m[1]), m[2], m[3], m[4])
			continue
		}
		if m := lineRe.FindStringSubmatch(msg); m != nil {
			l.errorf(atoi(m[1]), 1, "%s", m[2])
			continue
		}
		l.errorf(1, 1, "%s", msg)
	}
	return goOn
}

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}

// found is an index entry located from a decoder message, with the line as
// a fallback position.
type found struct {
	entry
	ok       bool
	fallback int
}

func (f found) line() int {
	if !f.ok {
		return f.fallback
	}
	if f.key != nil {
		return f.key.Line
	}
	return f.val.Line
}

func (f found) col() int {
	if !f.ok {
		return 1
	}
	if f.key != nil {
		return f.key.Column
	}
	return f.val.Column
}

// findKey finds the skip+1-th mapping key named name on line (the last one
// if there are fewer).
func (l *loader) findKey(line int, name string, skip int) found {
	hits := l.ix.keysAt(line, name)
	if len(hits) == 0 {
		return found{fallback: line}
	}
	return found{entry: l.ix.entries[hits[min(skip, len(hits)-1)]], ok: true}
}

// specTypes maps the Go type names the decoder prints to the types, for the
// list of known fields in an unknown-field message.
var specTypes = func() map[string]reflect.Type {
	m := map[string]reflect.Type{}
	for _, v := range []any{Spec{}, Guard{}, Feature{}, Fact{}, Capability{}, Parameter{}, Transport{}, Rule{}, Cond{}, ParamCond{}, Side{}, State{}, Transition{}} {
		t := reflect.TypeOf(v)
		m[t.String()] = t
	}
	return m
}()

// yamlFields lists the YAML names of a struct type's fields.
func yamlFields(t reflect.Type) []string {
	var out []string
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "-" {
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name)
		}
		out = append(out, name)
	}
	return out
}

func (l *loader) unknownField(line int, name, typ string) {
	e := l.findKey(line, name, 0)
	where := "this mapping"
	if e.ok {
		where = describePath(parentPath(e.path))
	}
	msg := fmt.Sprintf("unknown field %q in %s", name, where)
	if t, ok := specTypes[typ]; ok {
		known := yamlFields(t)
		if s := suggest(name, known); s != "" {
			msg += fmt.Sprintf("; did you mean %q?", s)
		} else {
			msg += " (known fields: " + strings.Join(known, ", ") + ")"
		}
	}
	l.errorf(e.line(), e.col(), "%s", msg)
}

// wrongKind reports a value the decoder could not put into its field.
func (l *loader) wrongKind(line int, tag, value, goType string) {
	var hit *entry
	for _, i := range l.ix.valuesAt(line) {
		e := &l.ix.entries[i]
		if e.val.ShortTag() != tag {
			continue
		}
		if value != "" && e.val.Value != value && !(strings.HasSuffix(value, "...") && strings.HasPrefix(e.val.Value, strings.TrimSuffix(value, "..."))) {
			continue
		}
		hit = e
		break
	}
	got := map[string]string{"!!str": "a string", "!!int": "an integer", "!!float": "a number", "!!bool": "a boolean", "!!null": "null", "!!map": "a mapping", "!!seq": "a list", "!!timestamp": "a timestamp", "!!binary": "binary data"}[tag]
	if got == "" {
		got = tag
	}
	if value != "" && tag != "!!null" {
		got += fmt.Sprintf(" (%s)", value)
	}
	if hit == nil {
		l.errorf(line, 1, "expected %s, got %s", wantKind(goType), got)
		return
	}
	l.errorf(hit.val.Line, hit.val.Column, "%s: expected %s, got %s", describePath(hit.path), wantKind(goType), got)
}

// wantKind describes a Go type as the YAML the decoder wanted.
func wantKind(goType string) string {
	switch {
	case strings.HasPrefix(goType, "[]"):
		return "a list"
	case strings.HasPrefix(goType, "map["), strings.HasPrefix(goType, "spec."), strings.HasPrefix(goType, "*spec."):
		return "a mapping"
	case goType == "bool":
		return "true or false"
	case goType == "string", goType == "*string":
		return "a string"
	case strings.HasPrefix(goType, "int"), strings.HasPrefix(goType, "uint"):
		return "an integer"
	}
	return goType
}

// suggest returns the candidate closest to name, if it is close enough to
// be a typo.
func suggest(name string, candidates []string) string {
	if len(candidates) > 500 {
		return "" // not a hand-written spec; spare the time
	}
	best, bestD := "", len(name)/3+2
	for _, c := range candidates {
		if d := editDistance(name, c); d < bestD {
			best, bestD = c, d
		}
	}
	return best
}

// editDistance is the Levenshtein distance of two short names.
func editDistance(a, b string) int {
	if len(a) > 64 || len(b) > 64 {
		return max(len(a), len(b))
	}
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			c := 1
			if a[i-1] == b[j-1] {
				c = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+c)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// didYouMean formats a suggestion suffix, or "".
func didYouMean(name string, candidates []string) string {
	if s := suggest(name, candidates); s != "" && s != name {
		return fmt.Sprintf(" (did you mean %q?)", s)
	}
	return ""
}
