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
