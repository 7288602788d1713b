package spec

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
)

// Error is one problem in a spec, at the position in its file that has to
// change. Line and Col count from 1; both are 0 when the position is
// unknown (a file that cannot be read at all).
type Error struct {
	File string
	Line int
	Col  int
	Msg  string
}

// Error formats the problem as "file:line:col: message", the form editors
// and compilers use.
func (e Error) Error() string {
	if e.Line == 0 {
		return e.File + ": " + e.Msg
	}
	return fmt.Sprintf("%s:%d:%d: %s", e.File, e.Line, e.Col, e.Msg)
}

// Errors is every problem Load found in one spec, sorted by position. Load
// returns it as *Errors; get at the list with errors.As:
//
//	var errs *spec.Errors
//	if errors.As(err, &errs) {
//		for _, e := range *errs { ... }
//	}
type Errors []Error

// Error joins the problems, one per line.
func (e *Errors) Error() string {
	if e == nil {
		return "<nil>"
	}
	lines := make([]string, len(*e))
	for i, x := range *e {
		lines[i] = x.Error()
	}
	return strings.Join(lines, "\n")
}

// sortErrors orders errors by line, column and message, and drops exact
// duplicates (two checks that found the same thing).
func sortErrors(errs []Error) []Error {
	slices.SortStableFunc(errs, func(a, b Error) int {
		return cmp.Or(cmp.Compare(a.Line, b.Line), cmp.Compare(a.Col, b.Col), cmp.Compare(a.Msg, b.Msg))
	})
	return slices.Compact(errs)
}
