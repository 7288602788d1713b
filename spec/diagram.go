package spec

import (
	"fmt"
	"strings"
)

// Diagram conventions shared by Mermaid and DOT.
//
//   - The initial state has an arrow from a start mark; terminal states have
//     an arrow to an end mark (Mermaid) or a double border (DOT).
//   - States whose configuration is frozen are filled grey.
//   - An edge is labelled with its trigger and, in brackets, its guards:
//     "connect [transport-compatible]".
//   - The refusal edge of a guarded edge (its else:) is labelled with the
//     negated guards, "connect ¬[transport-compatible]"; DOT also draws it
//     dashed and red.
//   - kind: ignore and kind: refuse edges are not drawn: they do not move
//     the machine. DOT lists them in the state's box ("ignores cancel",
//     "refuses cancel"); the Markdown tables list them for Mermaid, whose
//     state boxes cannot hold them reliably.

// edgeLabel is "trigger [g1, g2]" or, for the refusal edge, "trigger ¬[g1, g2]".
func edgeLabel(t *Transition, refusal bool) string {
	if len(t.Guards) == 0 {
		return t.On
	}
	neg := ""
	if refusal {
		neg = "¬"
	}
	return t.On + " " + neg + "[" + strings.Join(t.Guards, ", ") + "]"
}

// ignoredTriggers maps each state to the triggers it ignores, in spec order.
func (sd *Side) ignoredTriggers() map[string][]string { return sd.triggersOfKind(KindIgnore) }

// refusedTriggers maps each state to the triggers it refuses with a
// message (kind: refuse), in spec order.
func (sd *Side) refusedTriggers() map[string][]string { return sd.triggersOfKind(KindRefuse) }

func (sd *Side) triggersOfKind(kind string) map[string][]string {
	out := map[string][]string{}
	for _, t := range sd.Transitions {
		if t.Kind == kind {
			out[t.From] = append(out[t.From], t.On)
		}
	}
	return out
}

// mermaidKeywords are words a Mermaid state id must not be.
var mermaidKeywords = map[string]bool{
	"state": true, "note": true, "class": true, "classDef": true, "style": true,
	"direction": true, "click": true, "end": true, "as": true, "left": true, "right": true, "of": true,
}

// mermaidIDs gives every state a Mermaid identifier: the name itself when it
// is a plain word, otherwise the name with '-' (and anything else outside
// [A-Za-z0-9_]) turned into '_', made unique.
func mermaidIDs(sd *Side) map[string]string {
	ids := map[string]string{}
	used := map[string]bool{}
	for _, st := range sd.States {
		var b strings.Builder
		for _, r := range st.Name {
			if r == '_' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' {
				b.WriteRune(r)
			} else {
				b.WriteByte('_')
			}
		}
		id := b.String()
		if id == "" || mermaidKeywords[id] || id[0] >= '0' && id[0] <= '9' {
			id = "s_" + id
		}
		for base, n := id, 2; used[id]; n++ {
			id = fmt.Sprintf("%s_%d", base, n)
		}
		used[id] = true
		ids[st.Name] = id
	}
	return ids
}

// mermaidText keeps a label on one line and away from Mermaid's syntax.
func mermaidText(s string) string {
	return strings.NewReplacer("\n", " ", ":", " ", ";", ",", "\"", "'", "#", "", "%%", "%").Replace(s)
}

// Mermaid returns side's state graph (Incoming or Outgoing) as a Mermaid
// stateDiagram-v2, generated from the spec alone: states in spec order,
// guard names on the edges, refusal edges labelled with the negated guards,
// frozen states in the class "frozen" (grey). The output is deterministic.
// It returns "" for an unknown side.
func Mermaid(s *Spec, side string) string {
	sd := s.Side(side)
	if sd == nil {
		return ""
	}
	var b strings.Builder
	b.WriteString("stateDiagram-v2\n")
	fmt.Fprintf(&b, "    %%%% %s side, generated from the spec by spec.Mermaid\n", side)
	b.WriteString("    classDef frozen fill:#d9d9d9,stroke:#595959,color:#000000\n")
	frozen := mermaidBody(&b, sd, "", "    ")
	if len(frozen) > 0 {
		fmt.Fprintf(&b, "    class %s frozen\n", strings.Join(frozen, ","))
	}
	return b.String()
}

// MermaidSides returns the graphs of several sides as one Mermaid
// stateDiagram-v2 (one diagram, so one block renders it): each side is a
// composite state named after it, its states' identifiers prefixed with
// the side's initial ("i_", "o_") to keep them apart. Otherwise as
// Mermaid. It returns "" if a side is unknown.
func MermaidSides(s *Spec, sides ...string) string {
	var b strings.Builder
	b.WriteString("stateDiagram-v2\n")
	fmt.Fprintf(&b, "    %%%% %s sides, generated from the spec by spec.MermaidSides\n", strings.Join(sides, " and "))
	b.WriteString("    classDef frozen fill:#d9d9d9,stroke:#595959,color:#000000\n")
	var frozen []string
	for _, side := range sides {
		sd := s.Side(side)
		if sd == nil {
			return ""
		}
		fmt.Fprintf(&b, "    state \"%s side\" as %s {\n", mermaidText(side), sidePrefix(side)+"side")
		frozen = append(frozen, mermaidBody(&b, sd, sidePrefix(side), "        ")...)
		b.WriteString("    }\n")
	}
	if len(frozen) > 0 {
		fmt.Fprintf(&b, "    class %s frozen\n", strings.Join(frozen, ","))
	}
	return b.String()
}

// sidePrefix is the identifier prefix of a side's states in a diagram of
// several sides: its first letter and '_'.
func sidePrefix(side string) string {
	if side == "" {
		return "s_"
	}
	return strings.ToLower(side[:1]) + "_"
}

// mermaidBody writes sd's states and edges, identifiers prefixed with
// prefix and lines indented with indent; it returns the identifiers of the
// frozen states.
func mermaidBody(b *strings.Builder, sd *Side, prefix, indent string) []string {
	ids := mermaidIDs(sd)
	if prefix != "" {
		for k, v := range ids {
			ids[k] = prefix + v
		}
	}
	id := func(name string) string {
		if v, ok := ids[name]; ok {
			return v
		}
		return prefix + "undeclared_" + mermaidText(strings.ReplaceAll(name, "-", "_"))
	}
	for _, st := range sd.States {
		if ids[st.Name] != st.Name {
			fmt.Fprintf(b, "%sstate \"%s\" as %s\n", indent, mermaidText(st.Name), ids[st.Name])
		} else {
			fmt.Fprintf(b, "%s%s\n", indent, st.Name)
		}
	}
	fmt.Fprintf(b, "%s[*] --> %s\n", indent, id(sd.Initial))
	for i := range sd.Transitions {
		t := &sd.Transitions[i]
		if !t.isPermit() {
			continue
		}
		fmt.Fprintf(b, "%s%s --> %s : %s\n", indent, id(t.From), id(t.To), mermaidText(edgeLabel(t, false)))
		if t.Else != "" {
			fmt.Fprintf(b, "%s%s --> %s : %s\n", indent, id(t.From), id(t.Else), mermaidText(edgeLabel(t, true)))
		}
	}
	var frozen []string
	for _, st := range sd.States {
		if st.Terminal {
			fmt.Fprintf(b, "%s%s --> [*]\n", indent, ids[st.Name])
		}
		if st.Config == ConfigFrozen {
			frozen = append(frozen, ids[st.Name])
		}
	}
	return frozen
}

// dotQuote quotes s as a DOT string.
func dotQuote(s string) string {
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(s) + `"`
}

// DOT returns side's state graph (Incoming or Outgoing) in Graphviz's DOT
// language, with the same information as Mermaid: an arrow from a point to
// the initial state, frozen states filled grey, terminal states with a
// double border, guard names on the edges, refusal edges dashed and red,
// and the triggers a state ignores written in its box. The output is
// deterministic. It returns "" for an unknown side.
func DOT(s *Spec, side string) string {
	sd := s.Side(side)
	if sd == nil {
		return ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, "// %s side, generated from the spec by spec.DOT\n", side)
	fmt.Fprintf(&b, "digraph %s {\n", dotQuote(side))
	dotHeader(&b)
	dotBody(&b, sd, "", "\t")
	b.WriteString("}\n")
	return b.String()
}

// DOTSides returns the graphs of several sides as one DOT digraph (one
// document, so one SVG renders it): each side a cluster labelled with its
// name, its node identifiers prefixed with "SIDE/". Otherwise as DOT. It
// returns "" if a side is unknown.
func DOTSides(s *Spec, sides ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "// %s sides, generated from the spec by spec.DOTSides\n", strings.Join(sides, " and "))
	b.WriteString("digraph \"migctl\" {\n")
	dotHeader(&b)
	for _, side := range sides {
		sd := s.Side(side)
		if sd == nil {
			return ""
		}
		fmt.Fprintf(&b, "\tsubgraph %s {\n", dotQuote("cluster_"+side))
		fmt.Fprintf(&b, "\t\tlabel=%s;\n\t\tfontname=\"Helvetica\";\n", dotQuote(side+" side"))
		dotBody(&b, sd, side+"/", "\t\t")
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	return b.String()
}

func dotHeader(b *strings.Builder) {
	b.WriteString("\trankdir=TB;\n")
	b.WriteString("\tnode [shape=box, style=rounded, fontname=\"Helvetica\"];\n")
	b.WriteString("\tedge [fontname=\"Helvetica\", fontsize=10];\n")
}

// dotBody writes sd's nodes and edges, identifiers prefixed with prefix
// (labels keep the state names) and lines indented with indent.
func dotBody(b *strings.Builder, sd *Side, prefix, indent string) {
	q := func(name string) string { return dotQuote(prefix + name) }
	fmt.Fprintf(b, "%s%s [shape=point, label=\"\", width=0.15];\n", indent, q("__start"))
	ignored, refused := sd.ignoredTriggers(), sd.refusedTriggers()
	for _, st := range sd.States {
		label := st.Name
		if ig := ignored[st.Name]; len(ig) > 0 {
			label += "\nignores " + strings.Join(ig, ", ")
		}
		if rf := refused[st.Name]; len(rf) > 0 {
			label += "\nrefuses " + strings.Join(rf, ", ")
		}
		attrs := []string{"label=" + dotQuote(label)}
		if st.Config == ConfigFrozen {
			attrs = append(attrs, `style="rounded,filled"`, `fillcolor="#d9d9d9"`)
		}
		if st.Terminal {
			attrs = append(attrs, "peripheries=2")
		}
		fmt.Fprintf(b, "%s%s [%s];\n", indent, q(st.Name), strings.Join(attrs, ", "))
	}
	fmt.Fprintf(b, "%s%s -> %s;\n", indent, q("__start"), q(sd.Initial))
	for i := range sd.Transitions {
		t := &sd.Transitions[i]
		if !t.isPermit() {
			continue
		}
		fmt.Fprintf(b, "%s%s -> %s [label=%s];\n", indent, q(t.From), q(t.To), dotQuote(edgeLabel(t, false)))
		if t.Else != "" {
			fmt.Fprintf(b, "%s%s -> %s [label=%s, style=dashed, color=red, fontcolor=red];\n", indent, q(t.From), q(t.Else), dotQuote(edgeLabel(t, true)))
		}
	}
}
