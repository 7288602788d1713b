package mappedram

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/migctl/migctl/stream"
)

// squeeze/unsqueeze: fuzz inputs are files with zero runs squeezed (0xff
// 0xfe be32 n = n zero bytes), since a mapped-ram file is mostly holes.
func squeeze(b []byte) []byte {
	var out []byte
	for i := 0; i < len(b); {
		j := i
		for j < len(b) && b[j] == 0 {
			j++
		}
		if j-i >= 16 {
			out = append(out, 0xff, 0xfe, byte((j-i)>>24), byte((j-i)>>16), byte((j-i)>>8), byte(j-i))
			i = j
			continue
		}
		out = append(out, b[i])
		i++
	}
	return out
}

func unsqueeze(b []byte, limit int) []byte {
	var out []byte
	for i := 0; i < len(b) && len(out) < limit; {
		if i+6 <= len(b) && b[i] == 0xff && b[i+1] == 0xfe {
			n := int(b[i+2])<<24 | int(b[i+3])<<16 | int(b[i+4])<<8 | int(b[i+5])
			out = append(out, make([]byte, min(n, limit-len(out)))...)
			i += 6
			continue
		}
		out = append(out, b[i])
		i++
	}
	return out
}

// FuzzOpen: a hostile file never panics Open or Load, every refusal is
// classified, and Load writes only inside the blocks Open accepted.
func FuzzOpen(f *testing.F) {
	g := newGuest(f, 256<<10, 16<<10)
	path := filepath.Join(f.TempDir(), "seed.mig")
	save(f, path, g, saveOpts{})
	seed, err := os.ReadFile(path)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(squeeze(seed))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, packed []byte) {
		data := unsqueeze(packed, 8<<20)
		p := filepath.Join(dir, "fuzz.mig")
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		fh, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		defer fh.Close()
		o := Options{Limits: stream.Limits{MaxBlocks: 4, MaxDevicePayload: 4096, MaxJSON: 4096}}
		r, err := Open(fh, 0, o)
		if err != nil {
			var me *Error
			var de *stream.DecodeError
			if !errors.As(err, &me) && !errors.As(err, &de) {
				t.Fatalf("unclassified %T: %v", err, err)
			}
			return
		}
		defer r.Close()
		var total uint64
		for _, b := range r.Blocks() {
			total += b.Size
		}
		if total > uint64(len(data)) {
			t.Fatalf("blocks of %d bytes from a %d-byte file", total, len(data))
		}
		mem := map[string][]byte{}
		for _, b := range r.Blocks() {
			mem[b.Name] = make([]byte, b.Size)
		}
		if err := r.Load(context.Background(), func(n string) []byte { return mem[n] }); err != nil {
			t.Fatalf("verified file fails to load: %v", err)
		}
	})
}
