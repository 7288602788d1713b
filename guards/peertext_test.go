package guards_test

import (
	"strings"
	"testing"

	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/spec"
)

// A refusal quotes what the peer announced; the peer chose those bytes
// (issue 12: a 900 KB guest ID, escape sequences). Each quoted value is
// bounded and printable, and the refusal still says what differs.
func TestPeerMismatchQuotesBoundedPrintableText(t *testing.T) {
	s := defaultSpec(t)
	hostile := "\x1b[2J" + strings.Repeat("G", 900<<10)
	in := &guards.Input{Spec: s, Side: spec.Incoming, State: "listening", Trigger: "connect",
		Config: guards.DefaultConfig(s), Facts: map[string]string{"guest": "mine", "page-size": "4096"},
		Peer: &guards.Peer{Facts: map[string]string{"guest": hostile, "page-size": "4096"},
			Params: map[string]string{"multifd-compression": hostile}}}
	in.Previous = in.Config
	err := guards.Default().Run(guards.TransportCompatible, in)
	if err == nil {
		t.Fatal("a different guest ID was accepted")
	}
	msg := err.Error()
	for _, want := range []string{"guest differs", "mine", `\x1b[2J`, "GGGG"} {
		if !strings.Contains(msg, want) {
			t.Errorf("refusal does not contain %q: %.400q", want, msg)
		}
	}
	if strings.ContainsRune(msg, 0x1b) {
		t.Errorf("refusal carries a raw ESC: %.200q", msg)
	}
	// Two quoted values of MaxPeerText each, and the words around them.
	if len(msg) > 8*guards.MaxPeerText {
		t.Errorf("refusal is %d bytes: the peer's text is not bounded", len(msg))
	}
}

// The uuid fact (validate-uuid): compared when both ends have one, with
// QEMU's words; a destination without a UUID, or a source that sent none,
// is accepted.
func TestUUIDFact(t *testing.T) {
	s := defaultSpec(t)
	const one, two = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"
	for _, c := range []struct {
		name        string
		local, peer string // "" = none
		refuse      string
	}{
		{"match", one, one, ""},
		{"mismatch", two, one, "UUID received is " + one + " and local is " + two},
		{"destination without", "", one, ""},
		{"source without", two, "", ""},
	} {
		in := &guards.Input{Spec: s, Side: spec.Incoming, State: "listening", Trigger: "connect",
			Config: guards.DefaultConfig(s), Facts: map[string]string{}, Peer: &guards.Peer{Facts: map[string]string{}}}
		in.Previous = in.Config
		if c.local != "" {
			in.Facts["uuid"] = c.local
		}
		if c.peer != "" {
			in.Peer.Facts["uuid"] = c.peer
		}
		err := guards.Default().Run(guards.TransportCompatible, in)
		switch {
		case c.refuse == "" && err != nil:
			t.Errorf("%s: %v", c.name, err)
		case c.refuse != "" && (err == nil || !strings.Contains(err.Error(), c.refuse)):
			t.Errorf("%s: %v, want %q", c.name, err, c.refuse)
		}
	}
}
