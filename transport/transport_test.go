package transport

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// payload returns n deterministic pseudo-random bytes.
func payload(n int) []byte {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{1, 2, 3})
	r.Read(b)
	return b
}

// promptly bounds how long a test waits for something that must happen at
// once; exceeding it is a failure, not a timing assumption.
const promptly = 5 * time.Second

func mustParse(t testing.TB, uri string) Addr {
	t.Helper()
	a, err := Parse(uri)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// result carries a goroutine's outcome back to the test.
type result struct {
	data []byte
	err  error
}

// exchange runs one migration-like exchange over a bidirectional channel:
// the source sends data and half-closes, the destination reads to EOF and
// answers over the return path, the source reads the answer.
func exchange(t *testing.T, l Listener, src Conn, data []byte) {
	t.Helper()
	done := make(chan result, 1)
	deadline := time.Now().Add(2 * promptly)
	src.SetDeadline(deadline)
	go func() {
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		defer cancel()
		dst, err := l.Accept(ctx)
		if err != nil {
			done <- result{err: err}
			return
		}
		defer dst.Close()
		dst.SetDeadline(deadline)
		got, err := io.ReadAll(dst)
		if err != nil {
			done <- result{err: err}
			return
		}
		if _, err := fmt.Fprintf(dst, "ack %d", len(got)); err != nil {
			done <- result{err: err}
			return
		}
		done <- result{data: got, err: dst.CloseWrite()}
	}()
	if !src.ReturnPath() {
		t.Errorf("%s: ReturnPath() = false, want true", src.Addr())
	}
	if _, err := src.Write(data); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := src.CloseWrite(); err != nil {
		t.Fatalf("CloseWrite: %v", err)
	}
	ack, err := io.ReadAll(src)
	if err != nil {
		t.Fatalf("read return path: %v", err)
	}
	r := <-done
	if r.err != nil {
		t.Fatalf("destination: %v", r.err)
	}
	if !bytes.Equal(r.data, data) {
		t.Fatalf("destination got %d bytes, not the %d sent", len(r.data), len(data))
	}
	if want := fmt.Sprintf("ack %d", len(data)); string(ack) != want {
		t.Fatalf("return path carried %q, want %q", ack, want)
	}
}

// socketRoundTrip listens on uri, dials the bound address and exchanges
// data both ways.
func socketRoundTrip(t *testing.T, uri string) Addr {
	t.Helper()
	ctx := context.Background()
	l, err := Listen(ctx, mustParse(t, uri))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	src, err := Dial(ctx, l.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	exchange(t, l, src, payload(1<<20))
	return l.Addr()
}

func TestTCPv4(t *testing.T) {
	bound := socketRoundTrip(t, "tcp:127.0.0.1:0")
	if bound.Host != "127.0.0.1" || bound.Port == 0 {
		t.Fatalf("listener Addr() = %v, want 127.0.0.1 with the chosen port", bound)
	}
}

func TestTCPv6(t *testing.T) {
	probe, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skipf("IPv6 loopback unavailable on this machine: %v", err)
	}
	probe.Close()
	bound := socketRoundTrip(t, "tcp:[::1]:0")
	if bound.Host != "::1" || bound.Port == 0 || !strings.HasPrefix(bound.String(), "tcp:[::1]:") {
		t.Fatalf("listener Addr() = %v", bound)
	}
}

func TestTCPHostName(t *testing.T) {
	bound := socketRoundTrip(t, "tcp:localhost:0")
	if ip := net.ParseIP(bound.Host); ip == nil || !ip.IsLoopback() {
		t.Fatalf("listener on localhost reports %v, want the bound loopback IP", bound)
	}
}

func TestUnix(t *testing.T) {
	p := filepath.Join(t.TempDir(), "m.sock")
	bound := socketRoundTrip(t, "unix:"+p)
	if bound.Path != p {
		t.Fatalf("listener Addr() = %v", bound)
	}
	if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket file still there after Close: %v", err)
	}
}

// sndbuf returns a Conn's SO_SNDBUF.
func sndbuf(t *testing.T, c Conn) int {
	t.Helper()
	rc, err := c.(interface{ Unwrap() any }).Unwrap().(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	rc.Control(func(fd uintptr) { n, err = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF) })
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestSocketBuffers(t *testing.T) {
	ctx := context.Background()
	wmemDefault := 0
	if b, err := os.ReadFile("/proc/sys/net/core/wmem_default"); err == nil {
		wmemDefault, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	}
	dir := t.TempDir()
	for _, tc := range []struct {
		uri      string
		cfg      Config
		min, max int // bounds on SO_SNDBUF of both ends (the kernel doubles what it is given)
	}{
		{"unix:" + dir + "/a", Config{}, 2 << 20, 1 << 30},           // 4 MiB asked, maybe capped at wmem_max
		{"unix:" + dir + "/b", Config{SocketBuffer: -1}, 0, 1 << 20}, // the kernel default, ~208 KiB
		{"tcp:127.0.0.1:0", Config{SocketBuffer: 1 << 20}, 2 << 20, 1 << 30},
	} {
		l, err := tc.cfg.Listen(ctx, mustParse(t, tc.uri))
		if err != nil {
			t.Fatal(err)
		}
		c, err := tc.cfg.Dial(ctx, l.Addr())
		if err != nil {
			t.Fatal(err)
		}
		a, err := l.Accept(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for side, conn := range map[string]Conn{"dialled": c, "accepted": a} {
			if n := sndbuf(t, conn); n < tc.min || n > tc.max {
				t.Errorf("%s %+v: %s SO_SNDBUF = %d, want %d..%d (wmem_default %d)", tc.uri, tc.cfg, side, n, tc.min, tc.max, wmemDefault)
			}
		}
		c.Close()
		a.Close()
		l.Close()
	}
}

// fdOpen reports whether descriptor fd is open.
func fdOpen(fd int) bool {
	_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	return err == nil
}

func TestFDSocketpair(t *testing.T) {
	ctx := context.Background()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	src, err := Dial(ctx, mustParse(t, "fd:"+strconv.Itoa(fds[0])))
	if err != nil {
		unix.Close(fds[0])
		unix.Close(fds[1])
		t.Fatal(err)
	}
	defer src.Close()
	if _, ok := src.(interface{ Unwrap() any }).Unwrap().(*net.UnixConn); !ok {
		t.Errorf("socket fd wrapped as %T, want *net.UnixConn", src.(interface{ Unwrap() any }).Unwrap())
	}
	l, err := Listen(ctx, mustParse(t, "fd:"+strconv.Itoa(fds[1])))
	if err != nil {
		unix.Close(fds[1])
		t.Fatal(err)
	}
	defer l.Close()
	exchange(t, l, src, payload(1<<20))
	_, err = l.Accept(ctx)
	if !errors.Is(err, ErrSingleChannel) {
		t.Fatalf("second Accept: %v, want ErrSingleChannel", err)
	}
}

func TestFDListeningSocket(t *testing.T) {
	ctx := context.Background()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 8); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	sa, _ := unix.Getsockname(fd)
	port := sa.(*unix.SockaddrInet4).Port

	if _, err := Dial(ctx, mustParse(t, "fd:"+strconv.Itoa(fd))); err == nil || !strings.Contains(err.Error(), "listening socket") {
		t.Fatalf("Dial on a listening socket: %v", err)
	}
	if !fdOpen(fd) {
		t.Fatal("failed Dial closed the caller's descriptor")
	}
	l, err := Listen(ctx, mustParse(t, "fd:"+strconv.Itoa(fd)))
	if err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	defer l.Close()
	src, err := Dial(ctx, Addr{Scheme: SchemeTCP, Host: "127.0.0.1", Port: port})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	exchange(t, l, src, payload(64<<10))
}

func TestFDPipe(t *testing.T) {
	ctx := context.Background()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	src, err := Dial(ctx, mustParse(t, "fd:"+strconv.Itoa(p[1])))
	if err != nil {
		unix.Close(p[0])
		unix.Close(p[1])
		t.Fatal(err)
	}
	l, err := Listen(ctx, mustParse(t, "fd:"+strconv.Itoa(p[0])))
	if err != nil {
		src.Close()
		unix.Close(p[0])
		t.Fatal(err)
	}
	defer l.Close()
	dst, err := l.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	if src.ReturnPath() || dst.ReturnPath() {
		t.Error("a pipe reports a return path")
	}
	// A pipe is pollable: a deadline interrupts a Read that has no data.
	if err := dst.SetDeadline(time.Now().Add(time.Millisecond)); err != nil {
		t.Fatalf("SetDeadline on a pipe: %v", err)
	}
	if _, err := dst.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read past the deadline: %v, want os.ErrDeadlineExceeded", err)
	}
	dst.SetDeadline(time.Time{})

	data := payload(1 << 20) // larger than the pipe buffer: needs a concurrent reader
	sent := make(chan error, 1)
	go func() {
		_, err := src.Write(data)
		sent <- errors.Join(err, src.Close())
	}()
	got, err := io.ReadAll(dst)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("read %d bytes, want the %d written", len(got), len(data))
	}
}

func TestFDNamed(t *testing.T) {
	ctx := context.Background()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[1])
	if _, err := Dial(ctx, mustParse(t, "fd:migfd")); err == nil || !strings.Contains(err.Error(), "set Config.ResolveFD") {
		t.Fatalf("named fd without a resolver: %v", err)
	}
	cfg := Config{ResolveFD: func(name string) (int, error) {
		if name == "migfd" {
			return fds[0], nil
		}
		return -1, fmt.Errorf("no fd named %q", name)
	}}
	if _, err := cfg.Dial(ctx, mustParse(t, "fd:other")); err == nil || err.Error() != `dial fd:other: resolve descriptor name "other": no fd named "other"` {
		t.Fatalf("unknown name: %v", err)
	}
	defer unix.Close(fds[0])
	c, err := cfg.Dial(ctx, mustParse(t, "fd:migfd"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !fdOpen(fds[0]) {
		t.Fatal("Dial closed a named descriptor; it belongs to the resolver")
	}
	if _, err := c.Write([]byte("hi")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2)
	if _, err := unix.Read(fds[1], buf); err != nil || string(buf) != "hi" {
		t.Fatalf("peer read %q, %v", buf, err)
	}
}

func TestFDErrors(t *testing.T) {
	ctx := context.Background()
	// A descriptor that is not open.
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	unix.Close(p[1])
	_, err := Dial(ctx, mustParse(t, "fd:"+strconv.Itoa(p[1])))
	if !errors.Is(err, syscall.EBADF) || !strings.HasPrefix(err.Error(), "dial fd:"+strconv.Itoa(p[1])+": ") {
		t.Fatalf("closed fd: %v", err)
	}
	// The read end of a pipe cannot carry the outgoing stream, and the
	// failure leaves it open.
	_, err = Dial(ctx, mustParse(t, "fd:"+strconv.Itoa(p[0])))
	if err == nil || !strings.Contains(err.Error(), "open read-only") {
		t.Fatalf("read-only fd: %v", err)
	}
	if !fdOpen(p[0]) {
		t.Fatal("failed Dial closed the caller's descriptor")
	}
	unix.Close(p[0])
	// A datagram socket.
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	_, err = Listen(ctx, mustParse(t, "fd:"+strconv.Itoa(fd)))
	if err == nil || !strings.Contains(err.Error(), "not a stream socket") {
		t.Fatalf("datagram socket: %v", err)
	}
}

func TestFile(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "mig")
	data := payload(1 << 20)
	a := mustParse(t, "file:"+path)

	// A stale longer file is truncated.
	if err := os.WriteFile(path, payload(2<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	w, err := Dial(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	if w.ReturnPath() {
		t.Error("file: reports a return path")
	}
	if err := w.SetDeadline(time.Now()); err != nil {
		t.Errorf("SetDeadline on a file: %v, want nil", err)
	}
	if _, err := w.Read(make([]byte, 1)); err == nil {
		t.Error("Read on the outgoing file channel succeeded")
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if err := w.(Committer).Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("file mode %v", fi.Mode())
	}

	l, err := Listen(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for i := range 2 { // every Accept opens the file afresh
		r, err := l.Accept(ctx)
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(r)
		r.Close()
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("accept %d read %d bytes, want %d", i, len(got), len(data))
		}
	}
}

func TestFileOffset(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "mig")
	header := bytes.Repeat([]byte("H"), 4096)
	stale := bytes.Repeat([]byte("S"), 3<<20)
	if err := os.WriteFile(path, append(append([]byte{}, header...), stale...), 0o600); err != nil {
		t.Fatal(err)
	}
	a := mustParse(t, "file:"+path+",offset=4K")
	data := payload(1 << 20)
	w, err := Dial(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	whole, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if want := append(append([]byte{}, header...), data...); !bytes.Equal(whole, want) {
		t.Fatalf("file is %d bytes; want the header kept, the stream at the offset and no stale tail (%d bytes)", len(whole), len(want))
	}

	l, err := Listen(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	r, err := l.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	got, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("read %d bytes from the offset, want the %d written", len(got), len(data))
	}

	_, err = Listen(ctx, mustParse(t, "file:"+path+",offset=1G"))
	if err == nil || !strings.Contains(err.Error(), "beyond the end of the file") {
		t.Fatalf("offset past EOF: %v", err)
	}
}

func TestFileErrors(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	_, err := Listen(ctx, mustParse(t, "file:"+dir+"/missing"))
	if !errors.Is(err, os.ErrNotExist) || !strings.HasPrefix(err.Error(), "listen file:"+dir+"/missing: ") {
		t.Fatalf("missing file: %v", err)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = Dial(ctx, mustParse(t, "file:"+fifo))
	if err == nil || !strings.Contains(err.Error(), "named pipe") {
		t.Fatalf("FIFO: %v", err)
	}
}

func TestExec(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "mig")
	data := payload(1 << 20)

	w, err := Dial(ctx, mustParse(t, "exec:cat > "+path))
	if err != nil {
		t.Fatal(err)
	}
	if w.ReturnPath() {
		t.Error("exec: reports a return path")
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.(Committer).Commit(ctx); err != nil {
		t.Fatalf("Commit: %v", err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("Close after Commit: %v", err)
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, data) {
		t.Fatalf("command wrote %d bytes, want %d", len(got), len(data))
	}

	l, err := Listen(ctx, mustParse(t, "exec:cat "+path))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	r, err := l.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("read %d bytes, want %d", len(got), len(data))
	}
	if _, err := l.Accept(ctx); !errors.Is(err, ErrSingleChannel) {
		t.Fatalf("second Accept: %v", err)
	}
}

func TestExecOutgoingFailure(t *testing.T) {
	w, err := Dial(context.Background(), mustParse(t, "exec:echo first >&2; echo 'no space left' >&2; exit 3"))
	if err != nil {
		t.Fatal(err)
	}
	// The command never reads: writes fail once it is gone (EPIPE) or land
	// in the pipe buffer. Either way the failure must surface.
	_, werr := w.Write(payload(256 << 10))
	cerr := w.(Committer).Commit(context.Background())
	w.Close()
	var ce *CommandError
	if !errors.As(cerr, &ce) || !errors.Is(cerr, ErrNotDurable) {
		t.Fatalf("Commit: %v (write: %v), want a *CommandError and ErrNotDurable", cerr, werr)
	}
	if ce.ExitCode != 3 {
		t.Errorf("ExitCode = %d, want 3", ce.ExitCode)
	}
	want := `exec "echo first >&2; echo 'no space left' >&2; exit 3": exit status 3; stderr: first | no space left`
	if ce.Error() != want {
		t.Errorf("error\n got %q\nwant %q", ce.Error(), want)
	}
	if werr != nil && !errors.As(werr, &ce) {
		t.Errorf("Write failed with %v, want the *CommandError", werr)
	}
}

func TestExecIncomingFailure(t *testing.T) {
	ctx := context.Background()
	l, err := Listen(ctx, mustParse(t, "exec:echo partial; echo 'cannot read image' >&2; exit 5"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	r, err := l.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(r)
	var ce *CommandError
	if !errors.As(err, &ce) || ce.ExitCode != 5 || len(ce.Output) != 1 || ce.Output[0] != "cannot read image" {
		t.Fatalf("ReadAll: %v, want a *CommandError with status 5 and the stderr line", err)
	}
	if string(got) != "partial\n" {
		t.Fatalf("read %q before the failure", got)
	}
	if err := r.Close(); !errors.As(err, &ce) {
		t.Fatalf("Close: %v, want the *CommandError", err)
	}
}

func TestExecNotFound(t *testing.T) {
	a, err := FromChannel(MigrationAddress{Transport: "exec", Args: []string{"/nonexistent/migrate-helper", "x"}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = Dial(context.Background(), a)
	if !errors.Is(err, os.ErrNotExist) || !strings.HasPrefix(err.Error(), "dial exec:'/nonexistent/migrate-helper' 'x': ") {
		t.Fatalf("Dial: %v", err)
	}
}

func TestExecDeadline(t *testing.T) {
	ctx := context.Background()
	l, err := Listen(ctx, mustParse(t, "exec:sleep 60"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	r, err := l.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.SetDeadline(time.Now().Add(time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read: %v, want os.ErrDeadlineExceeded", err)
	}
	r.Close()
}

func TestAcceptCancel(t *testing.T) {
	for _, uri := range []string{"tcp:127.0.0.1:0", "unix:" + filepath.Join(t.TempDir(), "s")} {
		t.Run(uri[:strings.IndexByte(uri, ':')], func(t *testing.T) {
			l, err := Listen(context.Background(), mustParse(t, uri))
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()

			// Already cancelled.
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			if _, err := l.Accept(ctx); !errors.Is(err, context.Canceled) {
				t.Fatalf("pre-cancelled Accept: %v", err)
			}

			// Cancelled while waiting.
			ctx, cancel = context.WithTimeout(context.Background(), 20*time.Millisecond)
			defer cancel()
			got := make(chan error, 1)
			go func() {
				c, err := l.Accept(ctx)
				if c != nil {
					c.Close()
				}
				got <- err
			}()
			select {
			case err := <-got:
				if err != context.DeadlineExceeded {
					t.Fatalf("Accept: %v, want context.DeadlineExceeded itself", err)
				}
			case <-time.After(promptly):
				t.Fatal("Accept did not return after its context expired")
			}

			// The listener still works afterwards (the wake-up deadline was cleared).
			c, err := Dial(context.Background(), l.Addr())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			a, err := l.Accept(context.Background())
			if err != nil {
				t.Fatalf("Accept after a cancelled Accept: %v", err)
			}
			a.Close()

			// Closed while waiting.
			go func() {
				_, err := l.Accept(context.Background())
				got <- err
			}()
			l.Close()
			select {
			case err := <-got:
				if !errors.Is(err, net.ErrClosed) {
					t.Fatalf("Accept on a closed listener: %v, want net.ErrClosed", err)
				}
			case <-time.After(promptly):
				t.Fatal("Accept did not return after Close")
			}
		})
	}
}

func TestDialRefused(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	_, err = Dial(context.Background(), Addr{Scheme: SchemeTCP, Host: "127.0.0.1", Port: port})
	want := fmt.Sprintf("dial tcp:127.0.0.1:%d: connect: connection refused", port)
	if err == nil || err.Error() != want || !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("Dial: %v, want %q matching ECONNREFUSED", err, want)
	}

	_, err = Dial(context.Background(), mustParse(t, "unix:"+filepath.Join(t.TempDir(), "nobody")))
	if !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "nobody: connect: no such file or directory") {
		t.Fatalf("unix Dial: %v", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Dial(ctx, Addr{Scheme: SchemeTCP, Host: "127.0.0.1", Port: port}); !errors.Is(err, context.Canceled) {
		t.Fatalf("Dial with a cancelled context: %v", err)
	}
	if _, err := Listen(ctx, mustParse(t, "tcp:127.0.0.1:0")); !errors.Is(err, context.Canceled) {
		t.Fatalf("Listen with a cancelled context: %v", err)
	}
}

func TestUnixStaleSocket(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	p := filepath.Join(dir, "s")
	a := mustParse(t, "unix:"+p)

	// A socket file left by a listener that is gone: replaced.
	old, err := net.Listen("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	old.(*net.UnixListener).SetUnlinkOnClose(false)
	old.Close()
	if _, err := os.Lstat(p); err != nil {
		t.Fatal("test setup: stale socket file missing")
	}
	l, err := Listen(ctx, a)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	// While we listen, a second Listen must fail and leave us working.
	_, err = Listen(ctx, a)
	if !errors.Is(err, syscall.EADDRINUSE) || !strings.Contains(err.Error(), "another process is listening on "+p) {
		t.Fatalf("second Listen: %v", err)
	}
	c, err := Dial(ctx, a)
	if err != nil {
		t.Fatalf("first listener broken by the second Listen: %v", err)
	}
	defer c.Close()
	exchange(t, l, c, []byte("still here"))
	l.Close()
	if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("Close left the socket file behind")
	}

	// Not a socket: never removed.
	if err := os.WriteFile(p, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = Listen(ctx, a)
	if !errors.Is(err, syscall.EADDRINUSE) || !strings.Contains(err.Error(), "exists and is not a socket") {
		t.Fatalf("Listen over a regular file: %v", err)
	}
	if b, _ := os.ReadFile(p); string(b) != "precious" {
		t.Fatal("Listen clobbered a regular file")
	}
	os.Remove(p)

	// Our file replaced by someone else's: Close leaves it alone.
	l, err = Listen(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(p)
	other, err := net.Listen("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	l.Close()
	if _, err := os.Lstat(p); err != nil {
		t.Fatalf("Close removed a socket file it did not create: %v", err)
	}
}

func TestUnsupported(t *testing.T) {
	ctx := context.Background()
	for _, uri := range []string{"rdma:127.0.0.1:4446", "vsock:2:4446"} {
		a := mustParse(t, uri)
		_, derr := Dial(ctx, a)
		_, lerr := Listen(ctx, a)
		for _, err := range []error{derr, lerr} {
			if !errors.Is(err, ErrUnsupported) || !errors.Is(err, errors.ErrUnsupported) || !strings.Contains(err.Error(), uri) {
				t.Errorf("%s: %v, want ErrUnsupported naming the address", uri, err)
			}
		}
	}
}

func TestInvalidHandBuiltAddr(t *testing.T) {
	ctx := context.Background()
	for _, a := range []Addr{
		{},
		{Scheme: "tcp", Host: "127.0.0.1", Port: 70000},
		{Scheme: "unix"},
		{Scheme: "fd", FD: -3},
		{Scheme: "file", Path: "/x", Offset: -1},
		{Scheme: "exec"},
	} {
		if c, err := Dial(ctx, a); err == nil {
			c.Close()
			t.Errorf("Dial(%#v) succeeded", a)
		}
	}
}

// TestZeroCopy checks that io.Copy between Conns reaches the underlying
// objects (whose ReadFrom/WriteTo use splice and sendfile) and moves the
// bytes intact: file -> tcp -> file.
func TestZeroCopy(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	in, out := filepath.Join(dir, "in"), filepath.Join(dir, "out")
	data := payload(4 << 20)
	if err := os.WriteFile(in, data, 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := Listen(ctx, mustParse(t, "tcp:127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	src, err := Dial(ctx, l.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	for _, c := range []Conn{src} {
		if _, ok := c.(io.ReaderFrom); !ok {
			t.Fatalf("%T hides io.ReaderFrom", c)
		}
		if _, ok := c.(io.WriterTo); !ok {
			t.Fatalf("%T hides io.WriterTo", c)
		}
		if _, ok := c.(interface{ Unwrap() any }).Unwrap().(*net.TCPConn); !ok {
			t.Fatalf("Unwrap() = %T", c.(interface{ Unwrap() any }).Unwrap())
		}
	}
	recv := make(chan error, 1)
	go func() {
		dst, err := l.Accept(ctx)
		if err != nil {
			recv <- err
			return
		}
		defer dst.Close()
		fw, err := Dial(ctx, mustParse(t, "file:"+out))
		if err != nil {
			recv <- err
			return
		}
		_, err = io.Copy(fw, dst) // tcp -> file
		recv <- errors.Join(err, fw.(Committer).Commit(ctx), fw.Close())
	}()
	fl, err := Listen(ctx, mustParse(t, "file:"+in))
	if err != nil {
		t.Fatal(err)
	}
	defer fl.Close()
	fr, err := fl.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer fr.Close()
	n, err := io.Copy(src, io.LimitReader(fr, int64(len(data)))) // file -> tcp
	if err != nil || n != int64(len(data)) {
		t.Fatalf("copy file -> tcp: %d, %v", n, err)
	}
	src.CloseWrite()
	if err := <-recv; err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(out); !bytes.Equal(got, data) {
		t.Fatalf("out has %d bytes, want %d", len(got), len(data))
	}
}

func TestUnixLiveListenerNotProbed(t *testing.T) {
	ctx := context.Background()
	p := filepath.Join(t.TempDir(), "s")
	a := mustParse(t, "unix:"+p)
	l, err := Listen(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if listed, err := unixListenerListed(p); err != nil || !listed {
		t.Fatalf("unixListenerListed(%s) = %v, %v; want our listener found in %s", p, listed, err, procNetUnix)
	}
	// Found in /proc/net/unix: the second Listen refuses without
	// connecting, so the live listener sees no connection.
	if _, err := Listen(ctx, a); !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("second Listen: %v", err)
	}
	actx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if c, err := l.Accept(actx); err != context.DeadlineExceeded {
		if c != nil {
			c.Close()
		}
		t.Fatalf("the live listener received a connection (%v); the stale check must not probe it", err)
	}

	// Without /proc/net/unix (another namespace's view), the connect
	// probe still tells live from stale.
	saved := procNetUnix
	procNetUnix = filepath.Join(t.TempDir(), "absent")
	defer func() { procNetUnix = saved }()
	if _, err := Listen(ctx, a); !errors.Is(err, syscall.EADDRINUSE) || !strings.Contains(err.Error(), "another process is listening") {
		t.Fatalf("second Listen via the probe: %v", err)
	}
	c, err := l.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}

func TestProcUnixLine(t *testing.T) {
	cols, path, ok := procUnixLine("0000000077568ad1: 00000002 00000000 00010000 0001 01  1055 /run/a b.sock")
	if !ok || cols[3] != "00010000" || cols[6] != "1055" || path != "/run/a b.sock" {
		t.Fatalf("got %q %q %v", cols, path, ok)
	}
	if _, _, ok := procUnixLine("0000000077568ad1: 00000003 00000000 00000000 0001 03  1056"); ok {
		t.Fatal("a socket without a path parsed as having one")
	}
}
