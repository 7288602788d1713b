package control

import (
	"bytes"
	"testing"
)

// FuzzDecode feeds arbitrary bytes to Decode: it must never panic, and a
// message it accepts must re-encode to bytes that decode to the same message
// (QEMU_FILE and ERROR re-encode byte for byte).
func FuzzDecode(f *testing.F) {
	for _, g := range golden {
		b, _ := Append(nil, g.msg)
		f.Add(b)
	}
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Decode(b)
		if err != nil {
			return
		}
		again, err := Append(nil, m)
		if err != nil {
			t.Fatalf("decoded %+v but cannot re-encode: %v", m, err)
		}
		m2, err := Decode(again)
		if err != nil {
			t.Fatalf("re-encoded message does not decode: %v", err)
		}
		if m.Type != m2.Type || !bytes.Equal(m.Data, m2.Data) || m.Reason != m2.Reason ||
			len(m.Regs) != len(m2.Regs) || len(m.Blocks) != len(m2.Blocks) || len(m.Results) != len(m2.Results) ||
			len(m.Names) != len(m2.Names) || m.Comp != m2.Comp {
			t.Fatalf("round trip changed %+v into %+v", m, m2)
		}
	})
}
