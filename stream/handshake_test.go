package stream

import (
	"errors"
	"testing"
)

func TestHandshakeCheck(t *testing.T) {
	local := testHandshake()
	local.Protocol, local.Side = HandshakeProtocol, SideDestination
	peer := testHandshake()
	peer.Protocol, peer.Side = HandshakeProtocol, SideSource
	if err := local.Check(peer); err != nil {
		t.Fatalf("identical: %v", err)
	}
	// A smaller source block is fine (QEMU resizes), Extra is never compared.
	peer.RAMBlocks = map[string]uint64{"pc.ram": ramSize / 2, romName: romSize}
	peer.Extra = map[string]string{"build": "other"}
	if err := local.Check(peer); err != nil {
		t.Fatalf("smaller block: %v", err)
	}

	peer = &Handshake{
		Protocol:     2,
		Side:         SideDestination,
		Capabilities: map[string]bool{"multifd": true, "return-path": true, "mapped-ram": false},
		Parameters:   map[string]string{"downtime-limit": "500", "max-bandwidth": "1"},
		PageSize:     16384,
		GuestID:      "other",
		RAMBlocks:    map[string]uint64{"pc.ram": 2 * ramSize, "vga.vram": testPS},
	}
	err := local.Check(peer)
	if !errors.Is(err, ErrHandshake) {
		t.Fatalf("got %v", err)
	}
	want := `stream: handshake mismatch: peer speaks handshake protocol 2, this side 1; both sides say they are the destination; ` +
		`capability "mapped-ram" is off on the peer but unknown here; capability "multifd" is off here but on on the peer; ` +
		`capability "xbzrle" is off here but unknown to the peer; parameter "downtime-limit" is "300" here but "500" on the peer; ` +
		`parameter "max-bandwidth" is "1" on the peer but unknown here; parameter "multifd-channels" is "2" here but unknown to the peer; ` +
		`peer page size 16384, this side 4096; peer migrates guest "other", this side expects "guest-7f3a"; ` +
		`RAM block "/rom@etc/acpi/tables" exists here but the peer does not send it; ` +
		`RAM block "pc.ram" is 0x20000 bytes on the peer but only 0x10000 here; RAM block "vga.vram" (0x1000 bytes) does not exist here`
	if err.Error() != want {
		t.Errorf("got\n%s\nwant\n%s", err, want)
	}
}
