package transport

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// openFDs lists this process's open descriptors with what they point at.
func openFDs(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot list /proc/self/fd: %v", err)
	}
	var out []string
	for _, e := range ents {
		target, _ := os.Readlink("/proc/self/fd/" + e.Name())
		out = append(out, e.Name()+" -> "+target)
	}
	sort.Strings(out)
	return out
}

// everyPath opens and closes one channel of each kind, and walks the
// failure paths, closing everything it is handed.
func everyPath(t *testing.T, dir string) {
	ctx := context.Background()
	check := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	pair := func(uri string) {
		t.Helper()
		l, err := Listen(ctx, mustParse(t, uri))
		check(err)
		c, err := Dial(ctx, l.Addr())
		check(err)
		a, err := l.Accept(ctx)
		check(err)
		check(c.Close())
		check(a.Close())
		check(l.Close())
	}
	pair("tcp:127.0.0.1:0")
	pair("unix:" + filepath.Join(dir, "s"))

	// Accept cancelled, listener closed.
	l, err := Listen(ctx, mustParse(t, "tcp:127.0.0.1:0"))
	check(err)
	cctx, cancel := context.WithTimeout(ctx, time.Millisecond)
	_, err = l.Accept(cctx)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatal(err)
	}
	check(l.Close())

	// Refused, cancelled, unsupported.
	if _, err := Dial(ctx, mustParse(t, "unix:"+filepath.Join(dir, "none"))); err == nil {
		t.Fatal("dial to nothing succeeded")
	}
	if _, err := Dial(ctx, mustParse(t, "rdma:127.0.0.1:1")); err == nil {
		t.Fatal("rdma dial succeeded")
	}

	// Stale socket replaced; live socket refused.
	old, err := net.Listen("unix", filepath.Join(dir, "stale"))
	check(err)
	old.(*net.UnixListener).SetUnlinkOnClose(false)
	old.Close()
	l, err = Listen(ctx, mustParse(t, "unix:"+filepath.Join(dir, "stale")))
	check(err)
	if _, err := Listen(ctx, mustParse(t, "unix:"+filepath.Join(dir, "stale"))); err == nil {
		t.Fatal("second listen succeeded")
	}
	check(l.Close())

	// fd: socketpair both ways, a listener closed before Accept, and a
	// refused descriptor that stays the caller's.
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	check(err)
	c, err := Dial(ctx, mustParse(t, "fd:"+strconv.Itoa(fds[0])))
	check(err)
	l, err = Listen(ctx, mustParse(t, "fd:"+strconv.Itoa(fds[1])))
	check(err)
	check(l.Close())
	check(c.Close())
	var p [2]int
	check(unix.Pipe2(p[:], unix.O_CLOEXEC))
	if _, err := Dial(ctx, mustParse(t, "fd:"+strconv.Itoa(p[0]))); err == nil {
		t.Fatal("dial on a read end succeeded")
	}
	unix.Close(p[0])
	unix.Close(p[1])

	// file: a save committed, a save aborted, in place at an offset;
	// read, listener closed unaccepted, missing file.
	f := filepath.Join(dir, "f")
	c, err = Dial(ctx, mustParse(t, "file:"+f))
	check(err)
	_, err = c.Write([]byte("data"))
	check(err)
	check(c.(Committer).Commit(ctx))
	check(c.Close())
	c, err = Dial(ctx, mustParse(t, "file:"+f))
	check(err)
	_, err = c.Write([]byte("aborted"))
	check(err)
	check(c.Close())
	c, err = Dial(ctx, mustParse(t, "file:"+f+",offset=8"))
	check(err)
	_, err = c.Write([]byte("data"))
	check(err)
	check(c.Close())
	l, err = Listen(ctx, mustParse(t, "file:"+f+",offset=8"))
	check(err)
	a, err := l.Accept(ctx)
	check(err)
	_, err = io.ReadAll(a)
	check(err)
	check(a.Close())
	check(l.Close())
	l, err = Listen(ctx, mustParse(t, "file:"+f))
	check(err)
	check(l.Close())
	if _, err := Listen(ctx, mustParse(t, "file:"+filepath.Join(dir, "missing"))); err == nil {
		t.Fatal("listen on a missing file succeeded")
	}

	// exec: success both ways, failure, command not found, listener
	// closed before Accept.
	c, err = Dial(ctx, mustParse(t, "exec:cat > "+f))
	check(err)
	_, err = c.Write([]byte("x"))
	check(err)
	check(c.(Committer).Commit(ctx))
	check(c.Close())
	l, err = Listen(ctx, mustParse(t, "exec:cat "+f))
	check(err)
	a, err = l.Accept(ctx)
	check(err)
	_, err = io.ReadAll(a)
	check(err)
	check(a.Close())
	check(l.Close())
	c, err = Dial(ctx, mustParse(t, "exec:echo bad >&2; exit 1"))
	check(err)
	if err := c.Close(); err == nil {
		t.Fatal("failing command closed cleanly")
	}
	if _, err := Dial(ctx, Addr{Scheme: SchemeExec, Args: []string{"/nonexistent"}}); err == nil {
		t.Fatal("missing command started")
	}
	l, err = Listen(ctx, mustParse(t, "exec:sleep 60"))
	check(err)
	check(l.Close())
}

// TestNoFDLeaks runs every path once to let the runtime open what it opens
// lazily (the poller), then checks that more rounds leave the descriptor
// table as it was. Goroutines are checked by goleak in TestMain.
func TestNoFDLeaks(t *testing.T) {
	dir := t.TempDir()
	everyPath(t, dir)
	before := openFDs(t)
	for range 3 {
		everyPath(t, dir)
	}
	// A descriptor of an earlier test's child process (os/exec closes its
	// pipes from its own goroutines) may still be open for a moment:
	// compare again for up to a second before calling it a leak. A real
	// leak stays.
	after := openFDs(t)
	for i := 0; i < 50 && strings.Join(before, "\n") != strings.Join(after, "\n"); i++ {
		time.Sleep(20 * time.Millisecond)
		after = openFDs(t)
	}
	if strings.Join(before, "\n") != strings.Join(after, "\n") {
		t.Fatalf("descriptors changed:\nbefore:\n  %s\nafter:\n  %s", strings.Join(before, "\n  "), strings.Join(after, "\n  "))
	}
}
