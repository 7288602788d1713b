package spec

import (
	"fmt"
	"strings"
)

// Generated sections of hand-written Markdown (the README's state
// diagram): the text between
//
//	<!-- BEGIN generated NAME: … -->
//	<!-- END generated NAME -->
//
// is written by cmd/specdocs and checked for staleness like the generated
// pages.

// SpliceGenerated returns doc with the body of its generated section name
// replaced by body. It fails when the markers are missing, repeated or out
// of order.
func SpliceGenerated(doc, name, body string) (string, error) {
	begin := "<!-- BEGIN generated " + name + ":"
	end := "<!-- END generated " + name + " -->"
	i := strings.Index(doc, begin)
	j := strings.Index(doc, end)
	if i < 0 || j < 0 || j < i || strings.Count(doc, begin) != 1 || strings.Count(doc, end) != 1 {
		return "", fmt.Errorf("want one %q line followed by one %q line", begin+" … -->", end)
	}
	nl := strings.IndexByte(doc[i:], '\n')
	if nl < 0 || i+nl >= j {
		return "", fmt.Errorf("the %q line must end before %q", begin, end)
	}
	return doc[:i+nl+1] + body + doc[j:], nil
}

// ReadmeDiagram is the README's generated section "states": both sides'
// state graphs as one Mermaid diagram (MermaidSides) in a fenced block.
func ReadmeDiagram(s *Spec) string {
	return "```mermaid\n" + MermaidSides(s, Incoming, Outgoing) + "```\n"
}
