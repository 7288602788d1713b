package spec

import (
	"errors"
	"strings"
	"testing"
)

// FuzzLoad feeds Load arbitrary bytes: it must never panic, must return
// either a spec or an *Errors whose entries all have a position and come
// sorted, and a spec it accepts must be drawable. The seeds are whole specs
// (30 KiB), which the fuzzer's input minimisation crawls through; run it
// with minimisation off:
//
//	go test ./spec -run XXX -fuzz FuzzLoad -fuzztime 20s -fuzzminimizetime 0
func FuzzLoad(f *testing.F) {
	f.Add(readDefault(f))
	f.Add([]byte(readSmall(f)))
	for _, c := range brokenCases {
		if c.text != nil {
			text, _ := unmark(*c.text)
			f.Add([]byte(text))
			continue
		}
		text := readSmall(f)
		for _, e := range c.edits {
			text = strings.Replace(text, e[0], e[1], 1)
		}
		text, _ = unmark(text)
		f.Add([]byte(text))
	}
	f.Add([]byte("a: &x [1, *x]\n"))
	f.Add([]byte("a: &a [*a, *a, *a]\nb: &b [*a, *a, *a]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := Load("fuzz.yaml", data, registry)
		if err != nil {
			if s != nil {
				t.Fatal("a spec returned with an error")
			}
			var errs *Errors
			if !errors.As(err, &errs) || len(*errs) == 0 {
				t.Fatalf("error is not a non-empty *Errors: %v", err)
			}
			for i, e := range *errs {
				if e.Line < 1 || e.Col < 1 || e.File != "fuzz.yaml" || e.Msg == "" {
					t.Fatalf("error without a position: %+v", e)
				}
				if i > 0 {
					p := (*errs)[i-1]
					if p.Line > e.Line || p.Line == e.Line && p.Col > e.Col {
						t.Fatalf("errors not sorted: %v before %v", p, e)
					}
				}
			}
			return
		}
		for _, side := range SideNames {
			_ = Mermaid(s, side)
			_ = DOT(s, side)
		}
		_ = StatesMarkdown(s)
		_ = RulesMarkdown(s)
	})
}

// BenchmarkLoadDefault measures a full Load of the default spec: two YAML
// parses, validation and graph lint.
func BenchmarkLoadDefault(b *testing.B) {
	data := readDefault(b)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Load("transitions.yaml", data, registry); err != nil {
			b.Fatal(err)
		}
	}
}
