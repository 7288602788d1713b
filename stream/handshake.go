package stream

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
)

// The migctl handshake: our extension to QEMU's stream (see the package doc).
const (
	// HandshakeIDStr is the idstr of the FULL section carrying the handshake.
	// QEMU's own loader fails cleanly on it ("Unknown savevm section"), and
	// analyze-migration.py shows it as an ordinary described device.
	HandshakeIDStr = "migctl/handshake"
	// HandshakeVersion is the section version of a handshake without a
	// UUID, the form every migctl reads.
	HandshakeVersion = 1
	// HandshakeVersionUUID is the section version of a handshake that
	// carries the guest's UUID (Handshake.UUID, capability validate-uuid).
	// A decoder that reads only version 1 refuses it cleanly, as a QEMU
	// destination refuses a configuration subsection it does not know,
	// rather than skipping a check the source asked for. Streams without a
	// UUID keep version 1, so older destinations still read them.
	HandshakeVersionUUID = 2
	// MaxExtensions and MaxExtensionName bound Handshake.Extensions.
	MaxExtensions    = 16
	MaxExtensionName = 64
	// HandshakeProtocol is the protocol version written in Handshake.Protocol.
	HandshakeProtocol = 1

	// SideSource and SideDestination are the values of Handshake.Side.
	SideSource      = "source"
	SideDestination = "destination"
)

// Handshake is what the source announces as the first device section, so the
// destination can refuse an incompatible migration before any page is
// loaded. It travels as JSON (the field tags below are the wire names).
type Handshake struct {
	// Protocol is the handshake protocol version, HandshakeProtocol.
	Protocol int `json:"protocol"`
	// Side is who wrote it: SideSource on the main stream.
	Side string `json:"side"`
	// Capabilities lists every capability that must be set identically on
	// both sides, enabled AND disabled ones, so a capability one side does
	// not know is noticed.
	Capabilities map[string]bool `json:"capabilities"`
	// Parameters lists the parameters that must match, as strings.
	Parameters map[string]string `json:"parameters"`
	// PageSize is the target page size of the RAM records.
	PageSize uint64 `json:"page_size"`
	// GuestID identifies the guest (it is also the configuration section's
	// machine name).
	GuestID string `json:"guest_id"`
	// RAMBlocks maps every RAM block's idstr to its size in bytes.
	RAMBlocks map[string]uint64 `json:"ram_blocks"`
	// Extra carries free-form information that is shown but never compared.
	Extra map[string]string `json:"extra,omitempty"`
	// UUID is the guest's UUID in the canonical lowercase 8-4-4-4-12 form,
	// sent by a source whose guest has one when the capability
	// validate-uuid is on (QEMU's configuration/uuid subsection); "" when
	// not sent. The destination compares it with its own whenever it
	// arrives. Only a version 2 section (HandshakeVersionUUID) carries it.
	UUID string `json:"uuid,omitempty"`
	// Extensions lists the migctl protocol extensions the source speaks
	// (ExtSwitchoverCommit). A destination that does not know one ignores
	// it (the JSON field is new; older destinations skip it) and a
	// destination answers with RPHello only those it speaks too.
	Extensions []string `json:"extensions,omitempty"`
}

// sectionVersion is the section version h is written with.
func (h *Handshake) sectionVersion() uint32 {
	if h.UUID != "" {
		return HandshakeVersionUUID
	}
	return HandshakeVersion
}

// validUUID reports whether s is a UUID in the canonical lowercase form.
func validUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
				return false
			}
		}
	}
	return true
}

// Check compares a handshake received from the peer with this side's own and
// returns nil, or an error wrapping ErrHandshake that lists every difference
// (sorted, so the message is stable). The destination calls
// local.Check(received) after reading the KindHandshake record.
//
// Rules: same protocol; opposite sides (when this side's Side is set); every
// capability and parameter present on both sides with equal values; same
// page size; same guest ID when both are set; the same RAM block names, each
// of the peer's no bigger than this side's.
func (h *Handshake) Check(peer *Handshake) error {
	var diffs []string
	add := func(format string, args ...any) { diffs = append(diffs, fmt.Sprintf(format, args...)) }
	if peer.Protocol != h.Protocol {
		add("peer speaks handshake protocol %d, this side %d", peer.Protocol, h.Protocol)
	}
	if h.Side != "" && peer.Side == h.Side {
		add("both sides say they are the %s", h.Side)
	}
	for _, k := range unionKeys(h.Capabilities, peer.Capabilities) {
		mine, okMine := h.Capabilities[k]
		theirs, okTheirs := peer.Capabilities[k]
		switch {
		case !okMine:
			add("capability %q is %s on the peer but unknown here", k, onOff(theirs))
		case !okTheirs:
			add("capability %q is %s here but unknown to the peer", k, onOff(mine))
		case mine != theirs:
			add("capability %q is %s here but %s on the peer", k, onOff(mine), onOff(theirs))
		}
	}
	for _, k := range unionKeys(h.Parameters, peer.Parameters) {
		mine, okMine := h.Parameters[k]
		theirs, okTheirs := peer.Parameters[k]
		switch {
		case !okMine:
			add("parameter %q is %q on the peer but unknown here", k, theirs)
		case !okTheirs:
			add("parameter %q is %q here but unknown to the peer", k, mine)
		case mine != theirs:
			add("parameter %q is %q here but %q on the peer", k, mine, theirs)
		}
	}
	if peer.PageSize != h.PageSize {
		add("peer page size %d, this side %d", peer.PageSize, h.PageSize)
	}
	if h.GuestID != "" && peer.GuestID != "" && h.GuestID != peer.GuestID {
		add("peer migrates guest %q, this side expects %q", peer.GuestID, h.GuestID)
	}
	if h.UUID != "" && peer.UUID != "" && h.UUID != peer.UUID {
		add("UUID received is %s and local is %s", peer.UUID, h.UUID)
	}
	for _, k := range unionKeys(h.RAMBlocks, peer.RAMBlocks) {
		mine, okMine := h.RAMBlocks[k]
		theirs, okTheirs := peer.RAMBlocks[k]
		switch {
		case !okMine:
			add("RAM block %q (%#x bytes) does not exist here", k, theirs)
		case !okTheirs:
			add("RAM block %q exists here but the peer does not send it", k)
		case theirs > mine:
			add("RAM block %q is %#x bytes on the peer but only %#x here", k, theirs, mine)
		}
	}
	if len(diffs) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %s", ErrHandshake, strings.Join(diffs, "; "))
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

func unionKeys[V any](a, b map[string]V) []string {
	keys := make([]string, 0, len(a)+len(b))
	for k := range a {
		keys = append(keys, k)
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	return keys
}

// parseHandshake decodes the handshake JSON of a section of the given
// version; detail describes the first problem, "" if none.
func parseHandshake(data []byte, version uint32) (*Handshake, string) {
	var h Handshake
	if err := json.Unmarshal(data, &h); err != nil {
		return nil, "handshake is not valid JSON: " + err.Error()
	}
	switch {
	case version == HandshakeVersion && h.UUID != "":
		return nil, fmt.Sprintf("a version %d handshake carries a UUID; only version %d does", HandshakeVersion, HandshakeVersionUUID)
	case version == HandshakeVersionUUID && !validUUID(h.UUID):
		return nil, fmt.Sprintf("handshake UUID %.64q is not a UUID in canonical lowercase form", h.UUID)
	}
	if h.Protocol < 1 {
		return nil, fmt.Sprintf("handshake protocol %d is not a version", h.Protocol)
	}
	if len(h.Extensions) > MaxExtensions {
		return nil, fmt.Sprintf("handshake lists %d extensions, at most %d allowed", len(h.Extensions), MaxExtensions)
	}
	for _, x := range h.Extensions {
		if len(x) == 0 || len(x) > MaxExtensionName || strings.IndexFunc(x, func(r rune) bool { return r <= ' ' || r > '~' }) >= 0 {
			return nil, fmt.Sprintf("handshake extension %.80q is not 1..%d printable ASCII characters without spaces", x, MaxExtensionName)
		}
	}
	if h.Side != SideSource && h.Side != SideDestination {
		return nil, fmt.Sprintf("handshake side %q is neither %q nor %q", h.Side, SideSource, SideDestination)
	}
	return &h, ""
}
