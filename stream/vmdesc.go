package stream

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
)

// VMDesc is the trailing vmdesc JSON: the page size and one entry per FULL
// section, in stream order. QEMU's scripts/analyze-migration.py walks the
// binary with it; the Encoder builds it from the sections it wrote.
type VMDesc struct {
	PageSize uint64         `json:"page_size"`
	Devices  []VMDescDevice `json:"devices"`
}

// VMDescDevice describes one FULL section: its idstr (Name), instance,
// vmstate name and version, and the fields of its payload in order.
type VMDescDevice struct {
	Name       string        `json:"name"`
	InstanceID uint32        `json:"instance_id"`
	VMSDName   string        `json:"vmsd_name"`
	Version    uint32        `json:"version"`
	Fields     []VMDescField `json:"fields"`
}

// VMDescField describes one field of a payload: its name, its VMStateInfo
// type name ("uint32", "buffer", ...) and how many bytes it occupies.
type VMDescField struct {
	Name string `json:"name"`
	Type string `json:"type"`
	Size uint64 `json:"size"`
}

// deviceFields is how every migctl FULL payload is described: a be32 length
// followed by that many bytes.
func deviceFields(n int) []VMDescField {
	return []VMDescField{
		{Name: "size", Type: "uint32", Size: 4},
		{Name: "data", Type: "buffer", Size: uint64(n)},
	}
}

// ParseVMDesc decodes vmdesc JSON (for instance the Data of a KindVMDesc
// record). Trailing spaces, which the Encoder may add, are accepted.
func ParseVMDesc(data []byte) (*VMDesc, error) {
	var d VMDesc
	if err := json.Unmarshal(data, &d); err != nil {
		return nil, fmt.Errorf("stream: vmdesc is not valid JSON: %w", err)
	}
	return &d, nil
}

// tailScanSafe reports whether a vmdesc of n bytes can be found by
// analyze-migration.py, which takes the last NUL byte of the file's tail and
// then the first '{' after it: no '{' (0x7b) may follow the last 0x00 byte of
// the be32 length (qemu-wire.md §3.1). The EOF byte before 0x06 is a NUL, so a
// length without any 0x00 byte must contain no 0x7b at all.
func tailScanSafe(n uint32) bool {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], n)
	last := bytes.LastIndexByte(b[:], 0)
	return bytes.IndexByte(b[last+1:], '{') < 0
}

// padVMDesc appends spaces (valid trailing JSON whitespace) until the length
// of js is tailScanSafe. At most 0x10000 spaces are needed (a length of the
// form 0x7bXXXX); in practice it is one or a few hundred.
func padVMDesc(js []byte) []byte {
	for !tailScanSafe(uint32(len(js))) {
		js = append(js, ' ')
	}
	return js
}
