package guest

import (
	"encoding/hex"
	"fmt"
)

// UUID is a guest's UUID, QEMU's -uuid: 16 bytes, written in the
// canonical 8-4-4-4-12 lowercase hexadecimal form. The zero UUID means
// none was set, as in QEMU without -uuid (query-uuid then shows
// 00000000-0000-0000-0000-000000000000). With the capability
// validate-uuid on, a source that has a UUID sends it and the destination
// refuses a migration whose UUID differs from its own.
type UUID [16]byte

// ParseUUID parses the canonical form (8-4-4-4-12 hexadecimal digits,
// either case), as QEMU's -uuid takes it.
func ParseUUID(s string) (UUID, error) {
	var u UUID
	if len(s) != 36 || s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-' {
		return u, fmt.Errorf("UUID %.64q: write it as 8-4-4-4-12 hexadecimal digits, e.g. 11111111-2222-3333-4444-555555555555: %w", s, ErrConfig)
	}
	hexDigits := s[0:8] + s[9:13] + s[14:18] + s[19:23] + s[24:36]
	if _, err := hex.Decode(u[:], []byte(hexDigits)); err != nil {
		return UUID{}, fmt.Errorf("UUID %q: %v: %w", s, err, ErrConfig)
	}
	return u, nil
}

// String returns the canonical lowercase form.
func (u UUID) String() string {
	var b [36]byte
	hex.Encode(b[0:8], u[0:4])
	b[8] = '-'
	hex.Encode(b[9:13], u[4:6])
	b[13] = '-'
	hex.Encode(b[14:18], u[6:8])
	b[18] = '-'
	hex.Encode(b[19:23], u[8:10])
	b[23] = '-'
	hex.Encode(b[24:36], u[10:16])
	return string(b[:])
}

// IsZero reports whether u is the zero UUID: none was set.
func (u UUID) IsZero() bool { return u == UUID{} }

// HasUUID is implemented by a guest that has a UUID (the built-in guest
// does, from Config.UUID). It is optional: a Guest without it has none.
type HasUUID interface {
	// UUID returns the guest's UUID; the zero UUID means none was set.
	UUID() UUID
}

// UUIDOf returns g's UUID and true when g has one set (it implements
// HasUUID and the UUID is not zero).
func UUIDOf(g Guest) (UUID, bool) {
	h, ok := g.(HasUUID)
	if !ok {
		return UUID{}, false
	}
	u := h.UUID()
	return u, !u.IsZero()
}
