package transport

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// peekTable is a table that also lets Probe look.
type peekTable struct{ table }

func (tb *peekTable) PeekFD(a Addr) (*os.File, error) {
	key := a.FDName
	if key == "" {
		key = strconv.Itoa(a.FD)
	}
	f, ok := tb.files[key]
	if !ok {
		return nil, errors.New("no descriptor " + key)
	}
	return f, nil
}

// An fd: endpoint has the properties of what its descriptor is, found by
// fstat; the expected properties are written here from the spec's
// transports (file: for a regular file, fd: for a socket) and what a pipe
// can do (one way, no return path).
func TestProbeFD(t *testing.T) {
	dir := t.TempDir()
	reg, err := os.Create(filepath.Join(dir, "saved.mig"))
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(sp[0])
	defer unix.Close(sp[1])
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	lfd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(lfd)
	if err := unix.Bind(lfd, &unix.SockaddrUnix{Name: filepath.Join(dir, "l.sock")}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(lfd, 1); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		fd   int
		want Props
	}{
		{"regular file", int(reg.Fd()), Props{Seekable: true, ExtraFDs: true}},
		{"socket", sp[0], Props{ReturnPath: true, Streamable: true}},
		{"listening socket", lfd, Props{ReturnPath: true, Streamable: true}},
		{"pipe", p[1], Props{Streamable: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok, err := Probe(mustParse(t, "fd:"+strconv.Itoa(tc.fd)))
			if err != nil || !ok {
				t.Fatalf("Probe: ok %v, %v", ok, err)
			}
			if got != tc.want {
				t.Fatalf("Probe = %+v, want %+v", got, tc.want)
			}
			// The probe neither takes nor changes the descriptor.
			if _, err := unix.FcntlInt(uintptr(tc.fd), unix.F_GETFD, 0); err != nil {
				t.Fatalf("descriptor %d after Probe: %v", tc.fd, err)
			}
		})
	}
	// Other schemes: the spec's declaration applies.
	for _, uri := range []string{"tcp:127.0.0.1:1", "file:" + reg.Name(), "unix:/x", "exec:true"} {
		if _, ok, err := Probe(mustParse(t, uri)); ok || err != nil {
			t.Errorf("Probe(%s): ok %v, err %v; want not probed", uri, ok, err)
		}
	}
	// A descriptor that is not open is an error, not a guess.
	if _, _, err := Probe(mustParse(t, "fd:1000000")); err == nil {
		t.Error("Probe of a closed descriptor succeeded")
	}
}

// With Config.Descriptors, Probe looks through the table (PeekFD) and
// leaves the descriptor there for the migration to take; a table that
// cannot be peeked at gives no answer (the declared properties apply).
func TestProbeDescriptors(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "saved.mig"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tb := &peekTable{table{files: map[string]*os.File{"mig": f}}}
	props, ok, err := (&Config{Descriptors: tb}).Probe(mustParse(t, "fd:mig"))
	if err != nil || !ok || props != (Props{Seekable: true, ExtraFDs: true}) {
		t.Fatalf("Probe through the table: %+v, ok %v, %v", props, ok, err)
	}
	if _, still := tb.files["mig"]; !still || len(tb.taken) != 0 {
		t.Fatal("Probe took the descriptor out of the table")
	}
	if _, _, err := (&Config{Descriptors: tb}).Probe(mustParse(t, "fd:other")); err == nil {
		t.Error("Probe of a name the table lacks succeeded")
	}
	if _, ok, err := (&Config{Descriptors: &tb.table}).Probe(mustParse(t, "fd:mig")); ok || err != nil {
		t.Errorf("Probe through a table without PeekFD: ok %v, %v; want no answer", ok, err)
	}
}

// RegularFile finds the file behind file: and regular-file fd: channels
// only.
func TestRegularFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f.mig")
	c, err := Dial(t.Context(), mustParse(t, "file:"+path))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if f, ok := RegularFile(c); !ok || f.Name() == "" {
		t.Fatal("RegularFile(file:) = false")
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	pc, err := Dial(t.Context(), mustParse(t, "fd:"+strconv.Itoa(p[1])))
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if _, ok := RegularFile(pc); ok {
		t.Fatal("RegularFile(fd: on a pipe) = true")
	}
	d, err := DupFile(func() *os.File { f, _ := RegularFile(c); return f }())
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
}
