package transport

import (
	"bytes"
	"context"
	"errors"
	"io"
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

// entries lists dir's names.
func entries(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// onlyEntry fails unless dir holds exactly name.
func onlyEntry(t *testing.T, dir, name string) {
	t.Helper()
	if got := entries(t, dir); len(got) != 1 || got[0] != name {
		t.Errorf("%s holds %q, want only %q (no temporary file left)", dir, got, name)
	}
}

// A file:PATH save goes to a temporary file next to PATH, with PATH's
// permissions, that can be written at offsets, sought, truncated and read
// back (what mapped-ram does); PATH stays as it was until Commit renames
// the temporary file over it. After Commit, Close and a second Commit do
// nothing.
func TestFileSaveCommit(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "guest.mig")
	previous := []byte("the previous save")
	if err := os.WriteFile(path, previous, 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o640); err != nil { // whatever the umask
		t.Fatal(err)
	}
	w, err := Dial(ctx, mustParse(t, "file:"+path))
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if _, ok := w.(Committer); !ok {
		t.Fatalf("%T does not implement Committer", w)
	}
	f, ok := w.(interface{ Unwrap() any }).Unwrap().(*os.File)
	if !ok {
		t.Fatalf("Unwrap() = %T, want *os.File", w.(interface{ Unwrap() any }).Unwrap())
	}
	tmp := f.Name()
	if filepath.Dir(tmp) != dir || !strings.HasPrefix(filepath.Base(tmp), ".guest.mig.migctl-") || !strings.HasSuffix(tmp, ".tmp") {
		t.Fatalf("the save is written to %s, want %s/.guest.mig.migctl-*.tmp", tmp, dir)
	}
	if fi, err := os.Stat(tmp); err != nil || fi.Mode().Perm() != 0o640 {
		var mode os.FileMode
		if fi != nil {
			mode = fi.Mode().Perm()
		}
		t.Fatalf("temporary file: mode %v (%v); want -rw-r----- (PATH's)", mode, err)
	}

	// Stream, then patch at offsets, as mapped-ram does.
	if _, err := w.Write([]byte("header--")); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(32); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("PAGE"), 16); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Seek(0, io.SeekEnd); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("trailer")); err != nil {
		t.Fatal(err)
	}
	back := make([]byte, 4)
	if _, err := f.ReadAt(back, 16); err != nil || string(back) != "PAGE" {
		t.Fatalf("ReadAt on the temporary file: %q, %v", back, err)
	}
	want := append([]byte("header--"+strings.Repeat("\x00", 8)+"PAGE"+strings.Repeat("\x00", 12)), "trailer"...)

	if got, _ := os.ReadFile(path); !bytes.Equal(got, previous) {
		t.Fatalf("before Commit, PATH holds %q, want the previous save", got)
	}
	if err := w.(Committer).Commit(ctx); err != nil {
		t.Fatalf("Commit: %v", err)
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, want) {
		t.Fatalf("after Commit, PATH holds %q, want %q", got, want)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o640 {
		t.Errorf("the new save has mode %v, want the previous one's -rw-r-----", fi.Mode().Perm())
	}
	onlyEntry(t, dir, "guest.mig")
	if err := w.(Committer).Commit(ctx); err != nil {
		t.Errorf("a second Commit: %v", err)
	}
	if err := w.Close(); err != nil {
		t.Errorf("Close after Commit: %v", err)
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, want) {
		t.Fatal("Close after Commit changed the save")
	}
}

// Close without Commit aborts a save: the temporary file is removed and
// PATH stays as it was, or absent if there was none.
func TestFileSaveAbort(t *testing.T) {
	for _, existed := range []bool{true, false} {
		t.Run("existed="+strconv.FormatBool(existed), func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "guest.mig")
			previous := []byte("the previous save")
			if existed {
				if err := os.WriteFile(path, previous, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			w, err := Dial(context.Background(), mustParse(t, "file:"+path))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := w.Write(payload(1 << 20)); err != nil {
				t.Fatal(err)
			}
			if err := w.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			if _, err := w.Write([]byte("x")); err == nil {
				t.Error("Write after Close succeeded")
			}
			if err := w.(Committer).Commit(context.Background()); !errors.Is(err, ErrNotDurable) || !errors.Is(err, net.ErrClosed) {
				t.Errorf("Commit after Close: %v, want ErrNotDurable and net.ErrClosed", err)
			}
			got, err := os.ReadFile(path)
			switch {
			case existed && !bytes.Equal(got, previous):
				t.Fatalf("after an aborted save PATH holds %d bytes (%v), want the previous save", len(got), err)
			case !existed && !errors.Is(err, os.ErrNotExist):
				t.Fatalf("after an aborted save PATH exists (%d bytes, %v), want none", len(got), err)
			}
			if existed {
				onlyEntry(t, dir, "guest.mig")
			} else if names := entries(t, dir); len(names) != 0 {
				t.Errorf("%s holds %q after an aborted save, want nothing", dir, names)
			}
		})
	}
}

// A Commit whose context already ended does not rename: PATH stays, and the
// temporary file is removed by the Close that follows.
func TestFileSaveCommitCancelled(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "guest.mig")
	if err := os.WriteFile(path, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	w, err := Dial(context.Background(), mustParse(t, "file:"+path))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("new")); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err = w.(Committer).Commit(ctx)
	var ce *CommitError
	if !errors.As(err, &ce) || !errors.Is(err, ErrNotDurable) || !errors.Is(err, context.Canceled) {
		t.Fatalf("Commit with a cancelled context: %v, want a *CommitError wrapping ErrNotDurable and context.Canceled", err)
	}
	if got, _ := os.ReadFile(path); string(got) != "old" {
		t.Fatalf("PATH holds %q after a failed Commit", got)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	onlyEntry(t, dir, "guest.mig")
}

// A Close racing with Commit (a cancel during the commit) has one winner:
// either Commit succeeded and PATH holds the new save, or it failed and
// PATH holds the previous one; no temporary file is left either way.
func TestFileSaveCloseDuringCommit(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "guest.mig")
	data := payload(4 << 20)
	outcomes := map[bool]int{}
	for range 20 {
		if err := os.WriteFile(path, []byte("old"), 0o600); err != nil {
			t.Fatal(err)
		}
		w, err := Dial(context.Background(), mustParse(t, "file:"+path))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(data); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- w.(Committer).Commit(context.Background()) }()
		cerr := w.Close()
		err = <-done
		got, _ := os.ReadFile(path)
		switch {
		case err == nil && !bytes.Equal(got, data):
			t.Fatalf("Commit succeeded but PATH holds %d bytes", len(got))
		case err != nil && string(got) != "old":
			t.Fatalf("Commit failed (%v) but PATH holds %d bytes, not the previous save", err, len(got))
		case err != nil && !errors.Is(err, ErrNotDurable):
			t.Fatalf("Commit: %v, want ErrNotDurable", err)
		case cerr != nil:
			t.Fatalf("Close: %v", cerr)
		}
		outcomes[err == nil]++
		onlyEntry(t, dir, "guest.mig")
	}
	t.Logf("committed %d times, aborted %d times", outcomes[true], outcomes[false])
}

// A save through a symbolic link replaces the file the link names, in that
// file's directory; the link stays a link.
func TestFileSaveThroughSymlink(t *testing.T) {
	linkDir, realDir := t.TempDir(), t.TempDir()
	real := filepath.Join(realDir, "guest.mig")
	link := filepath.Join(linkDir, "current.mig")
	if err := os.WriteFile(real, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	w, err := Dial(context.Background(), mustParse(t, "file:"+link))
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if _, err := w.Write([]byte("new")); err != nil {
		t.Fatal(err)
	}
	if err := w.(Committer).Commit(context.Background()); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Fatalf("the link was replaced: %v, %v", fi, err)
	}
	if got, _ := os.ReadFile(real); string(got) != "new" {
		t.Fatalf("the linked file holds %q", got)
	}
	onlyEntry(t, realDir, "guest.mig")
	onlyEntry(t, linkDir, "current.mig")
}

// What is not a regular file is written in place, never replaced: a device
// (file:/dev/null) and file:PATH,offset=N. Their Commit syncs (a regular
// file) and closes; Close after it does nothing.
func TestFileInPlace(t *testing.T) {
	ctx := context.Background()
	w, err := Dial(ctx, mustParse(t, "file:/dev/null"))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := w.(*fileConn); !ok {
		w.Close()
		t.Fatalf("file:/dev/null opened as %T, want written in place (*fileConn)", w)
	}
	if _, err := w.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := w.(Committer).Commit(ctx); err != nil {
		t.Fatalf("Commit on /dev/null: %v", err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("Close after Commit: %v", err)
	}

	path := filepath.Join(t.TempDir(), "mig")
	if err := os.WriteFile(path, []byte("HEADER--stale"), 0o600); err != nil {
		t.Fatal(err)
	}
	w, err = Dial(ctx, mustParse(t, "file:"+path+",offset=8"))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := w.(*fileConn); !ok {
		w.Close()
		t.Fatalf("file:PATH,offset=8 opened as %T, want written in place (*fileConn)", w)
	}
	if _, err := w.Write([]byte("stream")); err != nil {
		t.Fatal(err)
	}
	if err := w.(Committer).Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("Close after Commit: %v", err)
	}
	if got, _ := os.ReadFile(path); string(got) != "HEADER--stream" {
		t.Fatalf("file holds %q", got)
	}
}

// saveTarget never chooses a rename over something that is not a regular
// file (a rename over /dev/null would replace the device).
func TestSaveTarget(t *testing.T) {
	dir := t.TempDir()
	regular := filepath.Join(dir, "regular")
	if err := os.WriteFile(regular, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	dangling := filepath.Join(dir, "dangling")
	if err := os.Symlink(filepath.Join(dir, "nowhere"), dangling); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		path   string
		atomic bool
	}{
		{"/dev/null", false},
		{dangling, false},
		{regular, true},
		{filepath.Join(dir, "new"), true},
	} {
		_, _, atomic, err := saveTarget(tc.path)
		if err != nil || atomic != tc.atomic {
			t.Errorf("saveTarget(%s): atomic %v, %v; want %v", tc.path, atomic, err, tc.atomic)
		}
	}
}

// pgid returns the process group of an exec: channel's command.
func pgid(c Conn) int { return c.(*execConn).p.cmd.Process.Pid }

// groupGone fails if a process of group g is still alive: kill(-g, 0) finds
// none, or only zombies (a killed shell's child, reparented, waits for init
// to reap it: dead, but kill still finds it).
func groupGone(t *testing.T, g int) {
	t.Helper()
	if err := unix.Kill(-g, 0); errors.Is(err, unix.ESRCH) {
		return
	}
	if alive := liveInGroup(t, g); len(alive) > 0 {
		t.Errorf("process group %d still has live processes: %s", g, strings.Join(alive, "; "))
	}
}

// liveInGroup lists the processes of group g that are not zombies, from
// /proc/PID/stat ("pid (comm) state ppid pgrp ...").
func liveInGroup(t *testing.T, g int) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatalf("list /proc: %v", err)
	}
	var alive []string
	for _, e := range ents {
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue // not a process, or gone
		}
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 3 || f[2] != strconv.Itoa(g) || f[0] == "Z" {
			continue
		}
		alive = append(alive, e.Name()+" "+string(b[:i+1])+" state "+f[0])
	}
	return alive
}

// within runs f and fails the test if it has not returned within promptly
// (a hang guard, not a timing assertion).
func within(t *testing.T, what string, f func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		return err
	case <-time.After(promptly):
		t.Fatalf("%s did not return within %v", what, promptly)
		return nil
	}
}

// Close kills an exec: command's process group at once, on both sides: a
// command that never reads or never writes (and never exits) does not hold
// the close.
func TestExecCloseKills(t *testing.T) {
	ctx := context.Background()
	w, err := Dial(ctx, mustParse(t, "exec:exec sleep 1000"))
	if err != nil {
		t.Fatal(err)
	}
	g := pgid(w)
	err = within(t, "Close", w.Close)
	var ce *CommandError
	if !errors.As(err, &ce) || ce.ExitCode != -1 || !strings.Contains(err.Error(), "signal: killed (killed: its stdin was closed before it exited)") {
		t.Fatalf("Close: %v", err)
	}
	groupGone(t, g)

	l, err := Listen(ctx, mustParse(t, "exec:exec sleep 1000"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	r, err := l.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	g = pgid(r)
	if err := within(t, "Close", r.Close); !errors.As(err, &ce) || !strings.Contains(err.Error(), "killed: its stdout was closed before it exited") {
		t.Fatalf("Close: %v", err)
	}
	groupGone(t, g)

	// The whole group: a child the command started in the background too
	// (announced through a FIFO, so it exists before the Close).
	fifo := filepath.Join(t.TempDir(), "started")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	// Read-write: the open does not wait for a writer, and the FIFO is
	// pollable, so the deadline bounds the read.
	started, err := os.OpenFile(fifo, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer started.Close()
	w, err = Dial(ctx, mustParse(t, "exec:sleep 1000 & echo $! > "+fifo+"; exec sleep 1000"))
	if err != nil {
		t.Fatal(err)
	}
	g = pgid(w)
	started.SetReadDeadline(time.Now().Add(promptly))
	if _, err := started.Read(make([]byte, 16)); err != nil {
		w.Close()
		t.Fatalf("the command did not say it started its background child: %v", err)
	}
	within(t, "Close", w.Close)
	groupGone(t, g)

	// A listener closed before its channel was accepted kills the command.
	l, err = Listen(ctx, mustParse(t, "exec:exec sleep 1000"))
	if err != nil {
		t.Fatal(err)
	}
	g = pgid(l.(*singleListener).conn)
	within(t, "listener Close", l.Close)
	groupGone(t, g)
	if _, err := l.Accept(ctx); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v", err)
	}
}

// A command that closes its stdin before the stream ended and keeps
// running fails the Write (the command is killed, and the error says why)
// rather than holding it until the command exits.
func TestExecStdinClosedEarly(t *testing.T) {
	w, err := Dial(context.Background(), mustParse(t, "exec:exec 0<&-; exec sleep 1000"))
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	g := pgid(w)
	chunk := payload(64 << 10)
	err = within(t, "Write", func() error {
		for {
			if _, err := w.Write(chunk); err != nil {
				return err
			}
		}
	})
	var ce *CommandError
	if !errors.As(err, &ce) || !strings.Contains(err.Error(), "killed: it closed its standard input before the stream ended") {
		t.Fatalf("Write: %v", err)
	}
	groupGone(t, g)
}

// Commit on exec: bounded by its context: a command that read everything
// but keeps running is killed when the context ends; the error says so and
// wraps ErrNotDurable, the context's error and the *CommandError.
func TestExecCommitDeadline(t *testing.T) {
	w, err := Dial(context.Background(), mustParse(t, "exec:cat > /dev/null; exec sleep 1000"))
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	g := pgid(w)
	if _, err := w.Write(payload(1 << 20)); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	err = within(t, "Commit", func() error { return w.(Committer).Commit(ctx) })
	var ce *CommandError
	switch {
	case !errors.Is(err, ErrNotDurable), !errors.Is(err, context.DeadlineExceeded), !errors.As(err, &ce):
		t.Fatalf("Commit: %v, want ErrNotDurable, context.DeadlineExceeded and a *CommandError", err)
	case !strings.Contains(err.Error(), "after its stdin was closed"):
		t.Fatalf("Commit: %v, want it to say the command ran on after its stdin was closed", err)
	}
	groupGone(t, g)
}

// A Close during Commit (a cancel) ends the wait for the command at once.
func TestExecCloseDuringCommit(t *testing.T) {
	w, err := Dial(context.Background(), mustParse(t, "exec:cat > /dev/null; exec sleep 1000"))
	if err != nil {
		t.Fatal(err)
	}
	g := pgid(w)
	done := make(chan error, 1)
	go func() { done <- w.(Committer).Commit(context.Background()) }()
	within(t, "Close", w.Close)
	err = within(t, "Commit", func() error { return <-done })
	if !errors.Is(err, ErrNotDurable) {
		t.Fatalf("Commit: %v, want ErrNotDurable", err)
	}
	groupGone(t, g)
}

// fd: Commit closes: the reader of a pipe sees EOF after the bytes; a
// regular file is synced and closed. Close afterwards does nothing.
func TestFDCommit(t *testing.T) {
	ctx := context.Background()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	r := os.NewFile(uintptr(p[0]), "pipe-r")
	defer r.Close()
	w, err := Dial(ctx, mustParse(t, "fd:"+strconv.Itoa(p[1])))
	if err != nil {
		unix.Close(p[1])
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("stream")); err != nil {
		t.Fatal(err)
	}
	if err := w.(Committer).Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("Close after Commit: %v", err)
	}
	if err := r.SetReadDeadline(time.Now().Add(promptly)); err != nil && !errors.Is(err, os.ErrNoDeadline) {
		t.Fatal(err)
	}
	if got, err := io.ReadAll(r); err != nil || string(got) != "stream" {
		t.Fatalf("the pipe's reader got %q, %v; want the bytes then EOF", got, err)
	}

	path := filepath.Join(t.TempDir(), "f")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Dup(int(f.Fd()))
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	w, err = Dial(ctx, mustParse(t, "fd:"+strconv.Itoa(fd)))
	if err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("saved")); err != nil {
		t.Fatal(err)
	}
	if err := w.(Committer).Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("Close after Commit: %v", err)
	}
	if got, _ := os.ReadFile(path); string(got) != "saved" {
		t.Fatalf("file holds %q", got)
	}
}

// A real failing write through fd: (/dev/full: ENOSPC on every write) is
// reported by Write, before any Commit: an in-place save cannot be taken
// for complete.
func TestFDFailingWrite(t *testing.T) {
	f, err := os.OpenFile("/dev/full", os.O_WRONLY, 0)
	if err != nil {
		t.Skipf("no /dev/full: %v", err)
	}
	fd, err := unix.Dup(int(f.Fd()))
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	w, err := Dial(context.Background(), mustParse(t, "fd:"+strconv.Itoa(fd)))
	if err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	defer w.Close()
	if _, err := w.Write([]byte("x")); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("Write to /dev/full: %v, want ENOSPC", err)
	}
}
