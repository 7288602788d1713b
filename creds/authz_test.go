package creds

import (
	"fmt"
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"
)

// TestGlobMatch: GLib's g_pattern_match_simple semantics, expected values
// written by hand.
func TestGlobMatch(t *testing.T) {
	cases := []struct {
		pattern, s string
		want       bool
	}{
		{"", "", true},
		{"", "a", false},
		{"*", "", true},
		{"*", "anything, really", true},
		{"a*", "a", true},
		{"a*c", "abbbc", true},
		{"a*c", "abbbd", false},
		{"*CN=alice", "C=GB,O=Example,CN=alice", true},
		{"*CN=alice", "C=GB,CN=alice,OU=x", false},
		{"C=GB,O=Example Org,CN=*.example", "C=GB,O=Example Org,CN=src.example", true},
		{"?", "é", true}, // ? is one character, not one byte
		{"??", "é", false},
		{"a?c", "abc", true},
		{"a?c", "ac", false},
		{"*/*", "a/b", true}, // * crosses '/', unlike path.Match
		{"[ab]", "a", false}, // no character classes: [ is literal
		{"[ab]", "[ab]", true},
		{`a\*`, `a\bc`, true}, // no escapes: \ is literal and * still a wildcard
		{"**a**", "xxaxx", true},
		{"*a*b*c*", "aXbYc", true},
		{"*a*b*c*", "aXcYb", false},
		{"*ab", "aab", true}, // backtracking
		{"名*", "名前", true},
	}
	for _, tc := range cases {
		if got := GlobMatch(tc.pattern, tc.s); got != tc.want {
			t.Errorf("GlobMatch(%q, %q) = %v, want %v", tc.pattern, tc.s, got, tc.want)
		}
	}
}

// FuzzGlobMatch compares GlobMatch with a regular expression built from the
// pattern (an independent implementation of the same rules) on valid UTF-8.
func FuzzGlobMatch(f *testing.F) {
	f.Add("a*b?c", "aXXbYc")
	f.Add("*", "")
	f.Add("?*?", "ab")
	f.Fuzz(func(t *testing.T, pattern, s string) {
		if len(pattern) > 64 || len(s) > 256 || !utf8.ValidString(pattern) || !utf8.ValidString(s) {
			return
		}
		var re strings.Builder
		re.WriteString(`^`)
		for _, r := range pattern {
			switch r {
			case '*':
				re.WriteString(`(?s:.*)`)
			case '?':
				re.WriteString(`(?s:.)`)
			default:
				re.WriteString(regexp.QuoteMeta(string(r)))
			}
		}
		re.WriteString(`$`)
		want := regexp.MustCompile(re.String()).MatchString(s)
		if got := GlobMatch(pattern, s); got != want {
			t.Fatalf("GlobMatch(%q, %q) = %v, regexp %s says %v", pattern, s, got, re.String(), want)
		}
	})
}

// TestList: first matching rule wins, then the default policy (deny when
// not given), as qauthz_list_is_allowed.
func TestList(t *testing.T) {
	l, err := NewList("auth0", "", []Rule{
		{Match: "C=GB,CN=mallory", Policy: Deny},
		{Match: "C=GB,CN=*", Policy: Allow, Format: Glob},
		{Match: "C=FR,CN=bob", Policy: Allow},
	})
	if err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]bool{
		"C=GB,CN=mallory": false, // the first rule
		"C=GB,CN=alice":   true,  // the glob
		"C=FR,CN=bob":     true,  // exact
		"C=FR,CN=bobby":   false, // exact is exact; then the default
		"":                false,
	} {
		if got := l.IsAllowed(id); got != want {
			t.Errorf("IsAllowed(%q) = %v, want %v", id, got, want)
		}
	}
	open, _ := NewList("x", Allow, nil)
	if !open.IsAllowed("anyone") || open.ObjectID() != "x" {
		t.Fatal("policy allow with no rules")
	}
	for _, bad := range []struct {
		policy Policy
		rules  []Rule
		want   string
	}{
		{"maybe", nil, "Parameter 'policy' does not accept value 'maybe': use allow or deny"},
		{Deny, []Rule{{Match: "x", Policy: "yes"}}, "Parameter 'rules[0].policy' does not accept value 'yes'"},
		{Deny, []Rule{{Match: "x", Policy: Allow}, {Match: "y", Policy: Allow, Format: "regex"}}, "Parameter 'rules[1].format' does not accept value 'regex': use exact or glob"},
	} {
		if _, err := NewList("a", bad.policy, bad.rules); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("NewList(%v, %v): %v, want %q", bad.policy, bad.rules, err, bad.want)
		}
	}
}

// GlobMatch with a rule an operator would write.
func ExampleGlobMatch() {
	rule := "C=GB,O=Example Org,CN=*.migration.example"
	for _, dn := range []string{"C=GB,O=Example Org,CN=host1.migration.example", "CN=host1.migration.example,O=Example Org,C=GB"} {
		fmt.Println(GlobMatch(rule, dn))
	}
	// Output:
	// true
	// false
}
