package guards_test

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/transport"
)

// transport.Probe speaks the spec's property names, and what it finds
// agrees with the spec's declarations: an fd: on a regular file has
// exactly file's properties, one on a socket exactly fd's (which the spec
// declares for a socket).
func TestProbedPropsMatchTheSpec(t *testing.T) {
	s := defaultSpec(t)
	names := []string{spec.PropMultiChannel, spec.PropSeekable, spec.PropReturnPath, spec.PropExtraFDs, spec.PropStreamable}
	if m := (transport.Props{}).Map(); len(m) != len(names) {
		t.Fatalf("Props.Map has %d names, the spec %d", len(m), len(names))
	}
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(sp[0])
	defer unix.Close(sp[1])
	for _, tc := range []struct {
		fd       int
		declared string
	}{{int(f.Fd()), "file"}, {sp[0], "fd"}} {
		a, err := transport.Parse("fd:" + strconv.Itoa(tc.fd))
		if err != nil {
			t.Fatal(err)
		}
		p, ok, err := transport.Probe(a)
		if err != nil || !ok {
			t.Fatalf("Probe: %v %v", ok, err)
		}
		m := p.Map()
		tr := s.Transport(tc.declared)
		for _, n := range names {
			v, present := m[n]
			if !present || v != tr.Has(n) {
				t.Errorf("probed %s (as %s): %s = %v (present %v), the spec declares %v", a, tc.declared, n, v, present, tr.Has(n))
			}
		}
	}
}
