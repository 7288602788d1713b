package engine_test

// One-way saves (file:, exec:) and what they leave behind: a cancelled or
// failed save never destroys the previous good one, a completed save
// replaces it in one rename, and an exec: command can neither hold a
// migration nor outlive a cancel (issue 9, items 3, 4 and 6, and the commit
// point of one-way transports of item 1).
//
// hangGuard bounds waits for things that must happen at once (they take
// milliseconds); it is a guard against a hang, not a timing assertion. It is
// below the 30 s an exec: command used to be granted after its channel was
// closed, which is what makes the exec: tests fail against that behaviour.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/transport"
)

const hangGuard = 10 * time.Second

// awaitEnd waits for m to end, failing the test if it has not within the
// hang guard (after ending it, so the guests are not closed under it).
func awaitEnd(t *testing.T, m *engine.Migration) engine.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), hangGuard)
	defer cancel()
	r, err := m.Wait(ctx)
	if err != nil {
		_ = m.Cancel(context.Background())
		<-m.Done()
		t.Fatalf("the migration did not end within %v", hangGuard)
	}
	return r
}

// saveTo runs one outgoing migration of src to uri to its end.
func saveTo(t *testing.T, src *end, uri string, opts engine.Options) engine.Result {
	t.Helper()
	m, err := engine.Start(context.Background(), src.c, src.g, uri, opts)
	if err != nil {
		t.Fatalf("migrate %s: %v", uri, err)
	}
	return awaitEnd(t, m)
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// dirHolds fails unless dir holds exactly names (no temporary file left).
func dirHolds(t *testing.T, dir string, names ...string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range ents {
		got = append(got, e.Name())
	}
	slices.Sort(got)
	slices.Sort(names)
	if !slices.Equal(got, names) {
		t.Errorf("%s holds %q, want exactly %q", dir, got, names)
	}
}

// guestIntact checks that the source guest runs again with its memory
// intact, as after every failure before the commit point.
func guestIntact(t *testing.T, src *end) {
	t.Helper()
	if !src.g.Running() {
		t.Fatal("the source guest does not run after the failed or cancelled save")
	}
	src.g.Stop()
	defer src.g.Start()
	if err := src.g.Verify(); err != nil {
		t.Fatalf("source memory: %v", err)
	}
}

// waitTransferred waits until the outgoing side reports n bytes sent.
func waitTransferred(t *testing.T, sub *machine.Subscription, n uint64) {
	t.Helper()
	timeout := time.After(hangGuard)
	for {
		select {
		case ev := <-sub.C():
			if ev.Kind == machine.EventStats && ev.Side == spec.Outgoing && ev.Stats.Transferred >= n {
				return
			}
		case <-timeout:
			t.Fatalf("the source never reported %d bytes sent", n)
		}
	}
}

// Item 6: re-saving to the same file: path and cancelling half-way leaves
// the previous save byte for byte, during the new save and after it, and
// no temporary file.
func TestCancelledSaveKeepsPrevious(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "guest.mig")
	if r := saveTo(t, newEnd(t, false, guestCfg()), "file:"+path, engine.Options{}); r.State != "completed" {
		t.Fatalf("first save ended %s: %v", r.State, r.Err)
	}
	previous := readFile(t, path)

	src := newEnd(t, false, guestCfg())
	if err := src.c.SetParameters(context.Background(), map[string]any{"max-bandwidth": "8M"}); err != nil {
		t.Fatal(err)
	}
	sub := src.c.Subscribe(1024)
	defer sub.Close()
	m, err := engine.Start(context.Background(), src.c, src.g, "file:"+path, engine.Options{SectionBytes: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	waitTransferred(t, sub, testSize/2)
	if now := readFile(t, path); !bytes.Equal(now, previous) {
		t.Errorf("half-way through a new save, %s holds %d bytes, not the previous save (%d bytes)", path, len(now), len(previous))
	}
	if err := m.Cancel(context.Background()); err != nil {
		t.Fatal(err)
	}
	r := awaitEnd(t, m)
	if r.State != "cancelled" || !errors.Is(r.Err, engine.ErrCancelled) {
		t.Fatalf("the save ended %s: %v", r.State, r.Err)
	}
	if now := readFile(t, path); !bytes.Equal(now, previous) {
		t.Fatalf("after the cancelled save, %s holds %d bytes, not the previous save (%d bytes)", path, len(now), len(previous))
	}
	dirHolds(t, dir, "guest.mig")
	guestIntact(t, src)
}

// Item 4: a completed save replaces the previous one in one rename: a
// reader that opened the previous save keeps reading all of it, the name
// points at a new file that keeps the old one's permissions, nothing else
// is left in the directory, and the new save restores. (That the file and
// the directory were fsynced cannot be observed without a crash; the
// transport's tests cover the order of the steps.)
func TestCompletedSaveReplacesPrevious(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "guest.mig")
	if r := saveTo(t, newEnd(t, false, guestCfg()), "file:"+path, engine.Options{}); r.State != "completed" {
		t.Fatalf("first save ended %s: %v", r.State, r.Err)
	}
	previous := readFile(t, path)
	if err := os.Chmod(path, 0o640); err != nil {
		t.Fatal(err)
	}
	reader, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	before, err := reader.Stat()
	if err != nil {
		t.Fatal(err)
	}

	src := newEnd(t, false, guestCfg())
	if r := saveTo(t, src, "file:"+path, engine.Options{}); r.State != "completed" {
		t.Fatalf("second save ended %s: %v", r.State, r.Err)
	}
	if got, err := io.ReadAll(reader); err != nil || !bytes.Equal(got, previous) {
		t.Errorf("a reader of the previous save read %d bytes (%v) of its %d after the new save: the file was rewritten in place", len(got), err, len(previous))
	}
	after, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if os.SameFile(before, after) {
		t.Error("the new save is the same file as the previous one: written in place, not renamed")
	}
	if after.Mode().Perm() != 0o640 {
		t.Errorf("the new save has mode %v, want the previous save's -rw-r-----", after.Mode().Perm())
	}
	dirHolds(t, dir, "guest.mig")

	dst := newEnd(t, true, guestCfg())
	ctx, cancel := context.WithTimeout(context.Background(), hangGuard)
	defer cancel()
	in, err := loaders.Listen(ctx, dst.c, dst.g, "file:"+path, loaders.Options{})
	if err != nil {
		t.Fatal(err)
	}
	dr, err := in.Wait(ctx)
	if err != nil {
		in.Abort("test timed out")
		<-in.Done()
		t.Fatalf("restore did not end: %v", err)
	}
	if dr.State != "completed" {
		t.Fatalf("restore ended %s: %v", dr.State, dr.Err)
	}
	if checksum(t, src.g) != checksum(t, dst.g) {
		t.Fatal("the restored guest differs from the saved one")
	}
}

// An exec: save commits when the command exited 0, and restores.
func TestExecSaveRestores(t *testing.T) {
	path := filepath.Join(t.TempDir(), "guest.mig")
	src := newEnd(t, false, guestCfg())
	if r := saveTo(t, src, "exec:cat > "+path, engine.Options{}); r.State != "completed" {
		t.Fatalf("save ended %s: %v", r.State, r.Err)
	}
	dst := newEnd(t, true, guestCfg())
	ctx, cancel := context.WithTimeout(context.Background(), hangGuard)
	defer cancel()
	in, err := loaders.Listen(ctx, dst.c, dst.g, "exec:cat "+path, loaders.Options{})
	if err != nil {
		t.Fatal(err)
	}
	dr, err := in.Wait(ctx)
	if err != nil {
		in.Abort("test timed out")
		<-in.Done()
		t.Fatalf("restore did not end: %v", err)
	}
	if dr.State != "completed" || checksum(t, src.g) != checksum(t, dst.g) {
		t.Fatalf("restore ended %s (%v), or the guests differ", dr.State, dr.Err)
	}
}

// pidFIFO returns a shell snippet with which an exec: command announces
// its shell's pid (its process group: the transport starts it as a group
// leader), and a function that reads it.
func pidFIFO(t *testing.T) (snippet string, read func() int) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "pid")
	if err := unix.Mkfifo(p, 0o600); err != nil {
		t.Fatal(err)
	}
	// Opened read-write, a FIFO does not wait for a writer and never reads
	// EOF; it is pollable, so the deadline bounds the read.
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return "echo $$ > " + p, func() int {
		t.Helper()
		if err := f.SetReadDeadline(time.Now().Add(hangGuard)); err != nil {
			t.Fatal(err)
		}
		var line []byte
		b := make([]byte, 32)
		for !bytes.HasSuffix(line, []byte("\n")) {
			n, err := f.Read(b)
			if err != nil {
				t.Fatalf("read the command's pid: %v", err)
			}
			line = append(line, b[:n]...)
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(line)))
		if err != nil {
			t.Fatalf("the command announced %q", line)
		}
		return pid
	}
}

// groupGone fails if a process of the group pgid is still alive: kill(-pgid,
// 0) finds none, or only zombies (a killed process's child, reparented,
// waits for init to reap it: dead, but kill still finds it).
func groupGone(t *testing.T, pgid int) {
	t.Helper()
	if err := unix.Kill(-pgid, 0); errors.Is(err, unix.ESRCH) {
		return
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatalf("list /proc: %v", err)
	}
	for _, e := range ents {
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat") // "pid (comm) state ppid pgrp ..."
		if err != nil {
			continue // not a process, or gone
		}
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		if f := strings.Fields(string(b[i+1:])); len(f) >= 3 && f[2] == strconv.Itoa(pgid) && f[0] != "Z" {
			t.Errorf("the command's process group %d still has a live process: %s state %s", pgid, b[:i+1], f[0])
		}
	}
}

// Item 3: cancelling an exec: migration whose command never reads kills
// its process group at once; the source guest runs again.
func TestExecCancelKillsCommand(t *testing.T) {
	announce, pid := pidFIFO(t)
	src := newEnd(t, false, guestCfg())
	sub := src.c.Subscribe(1024)
	defer sub.Close()
	m, err := engine.Start(context.Background(), src.c, src.g, "exec:"+announce+"; exec sleep 1000", engine.Options{})
	if err != nil {
		t.Fatal(err)
	}
	pgid := pid()
	waitState(t, sub, "active")
	if err := m.Cancel(context.Background()); err != nil {
		t.Fatal(err)
	}
	r := awaitEnd(t, m)
	if r.State != "cancelled" || !errors.Is(r.Err, engine.ErrCancelled) {
		t.Fatalf("the migration ended %s: %v", r.State, r.Err)
	}
	groupGone(t, pgid)
	guestIntact(t, src)
}

// Item 3: a command that closes its stdin and keeps running fails the
// migration (the command is killed, and the error says why) instead of
// holding it active until the command exits; the source guest runs again.
func TestExecClosedStdinFails(t *testing.T) {
	announce, pid := pidFIFO(t)
	src := newEnd(t, false, guestCfg())
	m, err := engine.Start(context.Background(), src.c, src.g, "exec:"+announce+"; exec 0<&-; exec sleep 1000", engine.Options{})
	if err != nil {
		t.Fatal(err)
	}
	pgid := pid()
	r := awaitEnd(t, m)
	if r.State != "failed" || r.Err == nil || !strings.Contains(r.Err.Error(), "closed its standard input before the stream ended") {
		t.Fatalf("the migration ended %s: %v; want failed, saying the command closed its standard input", r.State, r.Err)
	}
	var ce *transport.CommandError
	if !errors.As(r.Err, &ce) || ce.ExitCode != -1 {
		t.Errorf("the error does not carry the killed command's *CommandError: %v", r.Err)
	}
	groupGone(t, pgid)
	guestIntact(t, src)
}

// The commit point of exec: is the command's exit with status 0. A command
// that read the whole stream but keeps running is killed when the
// confirmation time runs out, and the migration fails before its commit
// point: the source guest runs again.
func TestExecCommitBounded(t *testing.T) {
	announce, pid := pidFIFO(t)
	src := newEnd(t, false, guestCfg())
	m, err := engine.Start(context.Background(), src.c, src.g, "exec:"+announce+"; cat > /dev/null; exec sleep 1000",
		engine.Options{ConfirmTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	pgid := pid()
	r := awaitEnd(t, m)
	if r.State != "failed" || r.Err == nil || !strings.Contains(r.Err.Error(), "after its stdin was closed") {
		t.Fatalf("the migration ended %s: %v; want failed, saying the command ran on after its stdin was closed", r.State, r.Err)
	}
	if !errors.Is(r.Err, transport.ErrNotDurable) {
		t.Errorf("the error does not wrap transport.ErrNotDurable: %v", r.Err)
	}
	groupGone(t, pgid)
	guestIntact(t, src)
}

// A command that read the whole stream and failed fails the migration with
// its exit status and last stderr lines; the source guest runs again.
func TestExecCommitFailure(t *testing.T) {
	src := newEnd(t, false, guestCfg())
	r := saveTo(t, src, "exec:cat > /dev/null; echo 'disk quota exceeded' >&2; exit 3", engine.Options{})
	var ce *transport.CommandError
	if r.State != "failed" || !errors.As(r.Err, &ce) || ce.ExitCode != 3 {
		t.Fatalf("the migration ended %s: %v; want failed with the command's exit status 3", r.State, r.Err)
	}
	if !strings.Contains(r.Err.Error(), "stderr: disk quota exceeded") {
		t.Errorf("the error lacks the command's stderr: %v", r.Err)
	}
	guestIntact(t, src)
}

// failedSaveEnv selects, in a child test process, how its save fails.
const failedSaveEnv = "MIGCTL_TEST_FAILED_SAVE"

// Item 4: a save that fails on a real write error leaves the previous save
// byte for byte and no temporary file; the source guest runs again, and a
// new save succeeds once the cause is gone. Two real failing writes, each in
// a child process of this test binary (a process-wide change must not leak
// into the other tests):
//
//   - enospc: a full filesystem. The child runs in a new user and mount
//     namespace and mounts a 64 MiB tmpfs of its own; after a first save it
//     fills the filesystem up to 4 MiB, so the next save fails with ENOSPC.
//     Skipped where user namespaces are not allowed.
//   - efbig: a failing write on a filesystem with room. The child ignores
//     SIGXFSZ and lowers RLIMIT_FSIZE to 4 MiB after the first save, so the
//     next save's writes past 4 MiB fail with EFBIG.
func TestFailedSaveKeepsPrevious(t *testing.T) {
	if mode := os.Getenv(failedSaveEnv); mode != "" {
		failedSaveChild(t, mode)
		return
	}
	for _, tc := range []struct {
		mode string
		ns   bool
	}{{"enospc", true}, {"efbig", false}} {
		t.Run(tc.mode, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestFailedSaveKeepsPrevious$", "-test.v")
			cmd.Env = append(os.Environ(), failedSaveEnv+"="+tc.mode)
			if tc.ns {
				cmd.SysProcAttr = &syscall.SysProcAttr{
					Cloneflags:  syscall.CLONE_NEWUSER | syscall.CLONE_NEWNS,
					UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getuid(), Size: 1}},
					GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getgid(), Size: 1}},
				}
			}
			out, err := cmd.CombinedOutput()
			if err != nil && cmd.ProcessState == nil {
				t.Skipf("cannot start the child in a user and mount namespace (needed for a private tmpfs): %v", err)
			}
			if i := bytes.Index(out, []byte("--- SKIP")); i >= 0 {
				t.Skipf("child skipped: %s", out[i:])
			}
			if err != nil {
				t.Fatalf("child (%s): %v\n%s", tc.mode, err, out)
			}
			t.Logf("child (%s):\n%s", tc.mode, out)
		})
	}
}

// failedSaveChild is TestFailedSaveKeepsPrevious in the child process.
func failedSaveChild(t *testing.T, mode string) {
	dir := t.TempDir()
	var want syscall.Errno
	switch mode {
	case "enospc":
		want = syscall.ENOSPC
		// Our own mount namespace: keep the tmpfs from propagating out.
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			t.Skipf("cannot make the mounts private in the child's namespace: %v", err)
		}
		if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=64m,mode=0700"); err != nil {
			t.Skipf("cannot mount a tmpfs in the child's namespace: %v", err)
		}
		defer unix.Unmount(dir, unix.MNT_DETACH)
	case "efbig":
		want = syscall.EFBIG
	default:
		t.Fatalf("unknown mode %q", mode)
	}
	path := filepath.Join(dir, "guest.mig")
	if r := saveTo(t, newEnd(t, false, guestCfg()), "file:"+path, engine.Options{}); r.State != "completed" {
		t.Fatalf("first save ended %s: %v", r.State, r.Err)
	}
	previous := readFile(t, path)

	names := []string{"guest.mig"}
	switch mode {
	case "enospc":
		var st unix.Statfs_t
		if err := unix.Statfs(dir, &st); err != nil {
			t.Fatal(err)
		}
		free := int64(st.Bavail) * st.Bsize
		if free < 8<<20 {
			t.Fatalf("the tmpfs has only %d bytes free after the first save (%d bytes)", free, len(previous))
		}
		filler, err := os.Create(filepath.Join(dir, "filler"))
		if err != nil {
			t.Fatal(err)
		}
		err = unix.Fallocate(int(filler.Fd()), 0, 0, free-4<<20)
		filler.Close()
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, "filler")
	case "efbig":
		signal.Ignore(syscall.SIGXFSZ)
		var lim unix.Rlimit
		if err := unix.Getrlimit(unix.RLIMIT_FSIZE, &lim); err != nil {
			t.Fatal(err)
		}
		lim.Cur = 4 << 20
		if err := unix.Setrlimit(unix.RLIMIT_FSIZE, &lim); err != nil {
			t.Fatal(err)
		}
	}

	src := newEnd(t, false, guestCfg())
	r := saveTo(t, src, "file:"+path, engine.Options{})
	if r.State != "failed" || !errors.Is(r.Err, want) {
		t.Fatalf("the save ended %s: %v; want failed with %v", r.State, r.Err, want)
	}
	t.Logf("the save failed as it should: %v", r.Err)
	if now := readFile(t, path); !bytes.Equal(now, previous) {
		t.Fatalf("after the failed save, %s holds %d bytes, not the previous save (%d bytes)", path, len(now), len(previous))
	}
	dirHolds(t, dir, names...)
	guestIntact(t, src)

	// The cause gone, the same source saves.
	switch mode {
	case "enospc":
		if err := os.Remove(filepath.Join(dir, "filler")); err != nil {
			t.Fatal(err)
		}
	case "efbig":
		var lim unix.Rlimit
		if err := unix.Getrlimit(unix.RLIMIT_FSIZE, &lim); err != nil {
			t.Fatal(err)
		}
		lim.Cur = lim.Max
		if err := unix.Setrlimit(unix.RLIMIT_FSIZE, &lim); err != nil {
			t.Fatal(err)
		}
	}
	if r := saveTo(t, src, "file:"+path, engine.Options{}); r.State != "completed" {
		t.Fatalf("the save after the cause was removed ended %s: %v", r.State, r.Err)
	}
	dirHolds(t, dir, "guest.mig")
	if bytes.Equal(readFile(t, path), previous) {
		t.Error("the completed save left the previous file in place")
	}
	fmt.Fprintln(os.Stderr, "child done:", mode)
}
