package qmp

import (
	"context"
	"errors"
	"github.com/migctl/migctl/guest"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/transport"
)

// pipe returns a pipe whose ends the test closes at its end.
func pipe(t *testing.T) (r, w *os.File) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(); w.Close() })
	return r, w
}

// readerClosed reports whether every read end of the pipe whose write end
// is w is closed: a write then fails with EPIPE (Go ignores SIGPIPE on
// descriptors other than 1 and 2).
func readerClosed(w *os.File) bool {
	_, err := w.Write([]byte{0})
	return errors.Is(err, syscall.EPIPE)
}

func getfd(t *testing.T, cl *Client, name string, files ...*os.File) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	return cl.ExecuteWithFDs(ctx, "getfd", map[string]any{"fdname": name}, files...)
}

// getfd and closefd as QEMU's monitor has them, with QEMU's errors.
func TestGetFD(t *testing.T) {
	n := newNode(t, nodeOpts{})
	cl := n.client(t)

	r1, w1 := pipe(t)
	if err := getfd(t, cl, "one", r1); err != nil {
		t.Fatal(err)
	}
	r1.Close() // the server holds the only read end now
	if readerClosed(w1) {
		t.Fatal("the server did not keep the descriptor")
	}
	// The same name again replaces the descriptor and closes the old one.
	r2, w2 := pipe(t)
	if err := getfd(t, cl, "one", r2); err != nil {
		t.Fatal(err)
	}
	r2.Close()
	if !readerClosed(w1) || readerClosed(w2) {
		t.Fatal("getfd of a taken name did not replace the descriptor")
	}
	// closefd closes it; a second closefd finds nothing.
	run(t, cl, "closefd", map[string]any{"fdname": "one"})
	if !readerClosed(w2) {
		t.Fatal("closefd did not close the descriptor")
	}
	if e := fails(t, cl, "closefd", map[string]any{"fdname": "one"}); e.Desc != "File descriptor named 'one' not found" {
		t.Fatalf("closefd of an unknown name: %q", e.Desc)
	}
	// Several descriptors in one message: the first is kept, the others
	// closed.
	r3, w3 := pipe(t)
	r4, w4 := pipe(t)
	if err := getfd(t, cl, "three", r3, r4); err != nil {
		t.Fatal(err)
	}
	r3.Close()
	r4.Close()
	if readerClosed(w3) || !readerClosed(w4) {
		t.Fatal("getfd with two descriptors: want the first kept and the second closed")
	}
	// Descriptors sent with another command wait for a getfd; newer ones
	// replace them.
	r5, w5 := pipe(t)
	if err := cl.ExecuteWithFDs(context.Background(), "query-status", nil, r5); err != nil {
		t.Fatal(err)
	}
	r5.Close()
	r6, w6 := pipe(t)
	if err := cl.ExecuteWithFDs(context.Background(), "query-status", nil, r6); err != nil {
		t.Fatal(err)
	}
	r6.Close()
	if !readerClosed(w5) || readerClosed(w6) {
		t.Fatal("a newer message's descriptor did not replace the older one")
	}
	run(t, cl, "getfd", map[string]any{"fdname": "six"}) // takes the waiting one
	if readerClosed(w6) {
		t.Fatal("getfd did not take the waiting descriptor")
	}

	for _, c := range []struct {
		name  string
		files []*os.File
		want  string
	}{
		{"none", nil, "No file descriptor supplied via SCM_RIGHTS"},
		{"1st", []*os.File{os.Stdin}, "Parameter 'fdname' expects a name not starting with a digit"},
		{"a b", []*os.File{os.Stdin}, "without spaces"},
		{"", []*os.File{os.Stdin}, "non-empty"},
	} {
		err := getfd(t, cl, c.name, c.files...)
		var qe *Error
		if !errors.As(err, &qe) || !strings.Contains(qe.Desc, c.want) {
			t.Errorf("getfd %q: %v, want %q", c.name, err, c.want)
		}
	}
	if e := fails(t, cl, "migrate", map[string]any{"uri": "fd:nope"}); !strings.Contains(e.Desc, "File descriptor named 'nope' has not been found") {
		t.Fatalf("fd:NAME unknown: %q", e.Desc)
	}
	// Close closes what the table still holds.
	n.s.Close()
	if !readerClosed(w3) || !readerClosed(w6) {
		t.Fatal("the server's Close left descriptors open")
	}
}

// Descriptors travel over the unix socket only; a client of a TCP socket
// cannot pass any, nor close the owner's.
func TestGetFDOverTCP(t *testing.T) {
	n := newNode(t, nodeOpts{})
	addr, err := n.s.Listen("tcp:127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	owner := n.client(t)
	r, _ := pipe(t)
	if err := getfd(t, owner, "mine", r); err != nil {
		t.Fatal(err)
	}
	remote := dialQMP(t, "tcp:"+addr.String())
	if e := fails(t, remote, "getfd", map[string]any{"fdname": "x"}); !strings.Contains(e.Desc, "No file descriptor supplied via SCM_RIGHTS: descriptors can be passed only over the unix control socket") {
		t.Errorf("getfd over TCP: %q", e.Desc)
	}
	if e := fails(t, remote, "closefd", map[string]any{"fdname": "mine"}); !strings.Contains(e.Desc, "closefd is refused on this connection") {
		t.Errorf("closefd over TCP: %q", e.Desc)
	}
	if names, _ := n.s.FDs().Names(); len(names) != 1 || names[0] != "mine" {
		t.Fatalf("table after the TCP client: %v", names)
	}
}

// fd:N never reaches one of migctl's own descriptors (issue 12: migrate
// fd:N pointed at the guest's memfd wrote the stream over guest memory;
// migrate-incoming fd:N at the control listener hung every later client).
// Only numbers declared at startup (Inherit) are used.
func TestFDNumbersAreRefused(t *testing.T) {
	memGuest := testGuest()
	memGuest.Backing = guest.BackingMemfd // a guest whose RAM has a descriptor to point at
	src := newNode(t, nodeOpts{guest: &memGuest})
	dst := newNode(t, nodeOpts{dest: true})
	cs, cd := src.client(t), dst.client(t)
	memfd := src.g.Blocks()[0].FD
	if memfd < 0 {
		t.Fatal("the built-in guest has no memfd")
	}
	listener := listenerFD(t, dst.s)
	for _, c := range []struct {
		cl  *Client
		cmd string
		fd  int
	}{
		{cs, "migrate", memfd},
		{cs, "migrate-incoming", memfd},
		{cd, "migrate-incoming", listener},
		{cd, "migrate", listener},
	} {
		e := fails(t, c.cl, c.cmd, map[string]any{"uri": "fd:" + strconv.Itoa(c.fd)})
		if !strings.Contains(e.Desc, "was not passed to migctl serve with --fd") {
			t.Errorf("%s fd:%d: %q", c.cmd, c.fd, e.Desc)
		}
	}
	for _, cl := range []*Client{cs, cd} {
		if st := queryMigrate(t, cl).Status; st != "" {
			t.Fatalf("a migration started: %s", st)
		}
	}
	// The control socket still serves new clients.
	queryStatus(t, dst.client(t))
	// Declaring one of migctl's own descriptors is refused too: each is
	// close-on-exec, so it cannot have been inherited.
	if err := src.s.FDs().Inherit(memfd); err == nil || !strings.Contains(err.Error(), "close-on-exec") {
		t.Fatalf("Inherit(memfd): %v", err)
	}
	if err := dst.s.FDs().Inherit(listener); err == nil || !strings.Contains(err.Error(), "close-on-exec") {
		t.Fatalf("Inherit(listener): %v", err)
	}
}

// listenerFD returns the descriptor number of the server's unix listener.
func listenerFD(t *testing.T, s *Server) int {
	t.Helper()
	s.mu.Lock()
	ln := s.listeners[0].ln
	s.mu.Unlock()
	sc, ok := ln.(syscall.Conn)
	if !ok {
		t.Fatalf("listener %T has no descriptor", ln)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	fd := -1
	rc.Control(func(f uintptr) { fd = int(f) })
	return fd
}

// A descriptor inherited at startup (no close-on-exec) can be declared,
// becomes close-on-exec, and is taken once as fd:N.
func TestFDTableInherit(t *testing.T) {
	var p [2]int
	if err := unix.Pipe(p[:]); err != nil { // without O_CLOEXEC: as inherited
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	tb := NewFDTable()
	defer tb.Close()
	if err := tb.Inherit(p[1]); err != nil {
		t.Fatal(err)
	}
	if fl, _ := unix.FcntlInt(uintptr(p[1]), unix.F_GETFD, 0); fl&unix.FD_CLOEXEC == 0 {
		t.Fatal("an inherited descriptor stays inheritable by exec: children")
	}
	if err := tb.Inherit(p[1]); err == nil {
		t.Fatal("the same descriptor declared twice")
	}
	for _, n := range []int{0, 1, 2} {
		if err := tb.Inherit(n); err == nil || !strings.Contains(err.Error(), "standard input, output and error") {
			t.Errorf("Inherit(%d): %v", n, err)
		}
	}
	if err := tb.Inherit(1000); err == nil || !strings.Contains(err.Error(), "is not open") {
		t.Errorf("Inherit(1000): %v", err)
	}
	a := mustAddr(t, "fd:"+strconv.Itoa(p[1]))
	f, err := tb.TakeFD(a)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := tb.TakeFD(a); err == nil {
		t.Fatal("fd:N taken twice")
	}
}

func mustAddr(t *testing.T, uri string) transport.Addr {
	t.Helper()
	a, err := transport.Parse(uri)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// QEMU's /migration/fd_proto: each side registers its end of a socketpair
// with getfd, the destination takes it with migrate-incoming fd:NAME and
// the source with migrate fd:NAME; the migration completes over it, and
// the name is gone from both tables (closefd: not found).
func TestMigrateOverGetFD(t *testing.T) {
	src := newNode(t, nodeOpts{})
	dst := newNode(t, nodeOpts{dest: true})
	cs, cd := src.client(t), dst.client(t)
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	a, b := os.NewFile(uintptr(fds[0]), "src"), os.NewFile(uintptr(fds[1]), "dst")
	defer a.Close()
	defer b.Close()
	if err := getfd(t, cs, "fd-mig", a); err != nil {
		t.Fatal(err)
	}
	if err := getfd(t, cd, "fd-mig", b); err != nil {
		t.Fatal(err)
	}
	a.Close()
	b.Close()
	for _, cl := range []*Client{cs, cd} {
		run(t, cl, "migrate-set-capabilities", caps("events", true))
	}
	run(t, cd, "migrate-incoming", map[string]any{"uri": "fd:fd-mig", "exit-on-error": false})
	run(t, cs, "migrate", map[string]any{"uri": "fd:fd-mig"})
	waitStatus(t, cs, "completed")
	waitStatus(t, cd, "completed")
	for _, cl := range []*Client{cs, cd} {
		if e := fails(t, cl, "closefd", map[string]any{"fdname": "fd-mig"}); e.Desc != "File descriptor named 'fd-mig' not found" {
			t.Fatalf("closefd after the migration: %q", e.Desc)
		}
	}
	dst.g.Stop()
	if err := dst.g.Verify(); err != nil {
		t.Fatalf("destination guest: %v", err)
	}
}
