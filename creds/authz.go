package creds

import (
	"fmt"
	"unicode/utf8"
)

// Authorizer decides whether a peer identity (for TLS, its certificate's
// DN as [DN] writes it) may connect. QEMU's authz-list and authz-simple
// objects are Authorizers; tls-authz names one.
type Authorizer interface {
	// IsAllowed reports whether identity may connect.
	IsAllowed(identity string) bool
	// ObjectID is the object's id, for messages.
	ObjectID() string
}

// Policy is an authz-list rule's (and the list's default) verdict, as QEMU's
// QAuthZListPolicy.
type Policy string

// Policies.
const (
	Deny  Policy = "deny"
	Allow Policy = "allow"
)

// Format is how a rule's match is compared, as QEMU's QAuthZListFormat.
type Format string

// Formats.
const (
	// Exact compares the identity byte for byte (g_str_equal).
	Exact Format = "exact"
	// Glob matches with * (any run of characters, also empty) and ? (one
	// character), and nothing else special (g_pattern_match_simple: no
	// escapes, no [classes], * crosses every character).
	Glob Format = "glob"
)

// Rule is one authz-list rule (QAuthZListRule).
type Rule struct {
	Match  string `json:"match"`
	Policy Policy `json:"policy"`
	Format Format `json:"format,omitempty"` // default Exact
}

// List is QEMU's authz-list object: the first rule that matches decides;
// when none does, Policy does (default Deny). A List is not modified after
// it is built, so it is safe for concurrent use.
type List struct {
	ID     string
	Policy Policy
	Rules  []Rule
}

// NewList checks the rules and returns the list. policy "" means Deny, a
// rule's format "" means Exact.
func NewList(id string, policy Policy, rules []Rule) (*List, error) {
	if policy == "" {
		policy = Deny
	}
	if err := checkPolicy("policy", policy); err != nil {
		return nil, err
	}
	out := make([]Rule, len(rules))
	for i, r := range rules {
		if r.Format == "" {
			r.Format = Exact
		}
		if err := checkPolicy(fmt.Sprintf("rules[%d].policy", i), r.Policy); err != nil {
			return nil, err
		}
		if r.Format != Exact && r.Format != Glob {
			return nil, fmt.Errorf("Parameter 'rules[%d].format' does not accept value '%s': use exact or glob", i, r.Format)
		}
		out[i] = r
	}
	return &List{ID: id, Policy: policy, Rules: out}, nil
}

func checkPolicy(member string, p Policy) error {
	if p != Allow && p != Deny {
		return fmt.Errorf("Parameter '%s' does not accept value '%s': use allow or deny", member, p)
	}
	return nil
}

// IsAllowed applies the rules in order, as qauthz_list_is_allowed does.
func (l *List) IsAllowed(identity string) bool {
	for _, r := range l.Rules {
		var hit bool
		switch r.Format {
		case Glob:
			hit = GlobMatch(r.Match, identity)
		default:
			hit = r.Match == identity
		}
		if hit {
			return r.Policy == Allow
		}
	}
	return l.Policy == Allow
}

// ObjectID returns the list's id.
func (l *List) ObjectID() string { return l.ID }

// Simple is QEMU's authz-simple object: exactly one identity is allowed.
type Simple struct {
	ID       string
	Identity string
}

// IsAllowed reports whether identity is the allowed one.
func (s *Simple) IsAllowed(identity string) bool { return identity == s.Identity }

// ObjectID returns the object's id.
func (s *Simple) ObjectID() string { return s.ID }

// GlobMatch reports whether s matches pattern as GLib's
// g_pattern_match_simple matches it: * matches any run of characters
// (none included), ? exactly one character (a UTF-8 sequence, or one byte
// of invalid UTF-8), every other character itself. It runs in
// O(len(pattern)·len(s)) time and constant space.
func GlobMatch(pattern, s string) bool {
	p, i := 0, 0
	star, mark := -1, 0 // position after the last *, and where s stood then
	for i < len(s) {
		if p < len(pattern) {
			switch pattern[p] {
			case '*':
				p++
				star, mark = p, i
				continue
			case '?':
				_, n := utf8.DecodeRuneInString(s[i:])
				p++
				i += n
				continue
			default:
				pr, pn := utf8.DecodeRuneInString(pattern[p:])
				sr, sn := utf8.DecodeRuneInString(s[i:])
				if pr == sr && pn == sn && pattern[p:p+pn] == s[i:i+sn] {
					p += pn
					i += sn
					continue
				}
			}
		}
		if star < 0 {
			return false
		}
		// Let the last * take one more character and try again.
		_, n := utf8.DecodeRuneInString(s[mark:])
		mark += n
		p, i = star, mark
	}
	for p < len(pattern) && pattern[p] == '*' {
		p++
	}
	return p == len(pattern)
}
