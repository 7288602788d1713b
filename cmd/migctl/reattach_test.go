package main

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/migctl/migctl/guest/proc"
	"github.com/migctl/migctl/uffd"
)

// killServe kills a serve process with SIGKILL (not its guest process, in
// a process group of its own) and waits, bounded, until it is gone.
func killServe(t *testing.T, p *serveProc) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := p.cmd.Process.Wait(); done <- err }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not die of SIGKILL within 30s")
	}
}

// guestStats attaches to the guest process on sock as the only client
// (its serve is dead), reads its statistics and detaches, or with quit
// ends the guest process.
func guestStats(t *testing.T, sock string, quit bool) proc.Stats {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := proc.Attach(ctx, sock, proc.AttachOptions{})
	if err != nil {
		t.Fatalf("attach to the guest process after its serve died: %v", err)
	}
	defer c.Close()
	st, err := c.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if quit {
		if err := c.Quit(ctx); err != nil {
			t.Fatal(err)
		}
	}
	return st
}

// The acceptance row of postcopy no peer has, across processes: the
// destination's `migctl serve` is killed with SIGKILL during postcopy
// while pages are still missing. Its guest process lives on, its reader
// vCPU blocked on a missing page, never reading zeros; the source goes to
// postcopy-paused. A new `migctl serve --destination --reattach
// unix:SOCKET` takes the guest process over (none → postcopy-paused,
// the received bitmap rebuilt); migrate-recover on it and migrate
// resume=true on the source finish the migration, with the guests' RAM
// equal and no zero read by the reader.
func TestServeReattachAfterKill9(t *testing.T) {
	if err := uffd.Probe(); err != nil {
		t.Skipf("postcopy needs userfaultfd: %v", err)
	}
	gsock := filepath.Join(t.TempDir(), "guest.sock")
	src := startServe(t, "src", "--guest=size=32M,dirty-rate=64M,seed=7,postcopy=on")
	dst := startServe(t, "dst", "--guest=size=32M,dirty-rate=0,seed=7,postcopy=on,readers=1,socket="+gsock, "--destination")
	t.Cleanup(func() { src.run(`{"execute":"quit"}`); src.cmd.Wait() })
	if !strings.Contains(dst.banner, "guest process socket "+gsock) {
		t.Fatalf("serve's banner %q does not name the guest process's socket %s", dst.banner, gsock)
	}
	t.Cleanup(func() { // a guest process whose serve died does not outlive the test
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if c, err := proc.Attach(ctx, gsock, proc.AttachOptions{}); err == nil {
			_ = c.Quit(ctx)
		}
	})
	for _, p := range []*serveProc{src, dst} {
		p.ok(`{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"postcopy-ram","state":true}]}}`)
	}
	dst.ok(`{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0","exit-on-error":false}}`)
	port := listenPort(t, dst.info())
	// The background stream crawls so that the kill finds pages missing.
	src.ok(`{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":8388608,"max-postcopy-bandwidth":1048576}}`)
	src.ok(fmt.Sprintf(`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:%s"}}`, port))
	src.waitStatus("active")
	src.ok(`{"execute":"migrate-start-postcopy"}`)
	src.waitStatus("postcopy-active")
	dst.waitStatus("postcopy-active")
	// postcopy-active comes as the guest is started: wait (bounded) for
	// the reader's first fault, which only a running guest raises.
	deadline := time.Now().Add(60 * time.Second)
	for tick := time.NewTicker(10 * time.Millisecond); ; <-tick.C {
		if i := src.postcopyInfo(); i.RAM != nil && i.RAM.PostcopyRequests > 0 {
			tick.Stop()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the source served no page request within 60s of postcopy-active")
		}
	}

	killServe(t, dst)
	src.waitStatus("postcopy-paused")
	st := guestStats(t, gsock, false)
	if !st.Running || st.LostReads != 0 || st.Received >= st.Pages || st.Attaches != 2 {
		t.Fatalf("the guest process after its serve died: %+v; want running, no lost read, pages missing, this the 2nd session", st)
	}
	t.Logf("serve killed with %d of %d pages received; the reader blocked, no page read as zeros", st.Received, st.Pages)

	dst2 := startServe(t, "dst2", "--destination", "--reattach", "unix:"+gsock)
	t.Cleanup(func() { dst2.run(`{"execute":"quit"}`); dst2.cmd.Wait() })
	if !strings.Contains(dst2.banner, gsock+" reattached: postcopy-paused") {
		t.Fatalf("the reattached serve's banner %q", dst2.banner)
	}
	if s := dst2.postcopyInfo().Status; s != "postcopy-paused" {
		t.Fatalf("the reattached destination's query-migrate status %q, want postcopy-paused", s)
	}
	rsock := filepath.Join(t.TempDir(), "recover.sock")
	dst2.ok(fmt.Sprintf(`{"execute":"migrate-recover","arguments":{"uri":"unix:%s"}}`, rsock))
	src.ok(`{"execute":"migrate-set-parameters","arguments":{"max-postcopy-bandwidth":0}}`)
	src.ok(fmt.Sprintf(`{"execute":"migrate","arguments":{"uri":"unix:%s","resume":true}}`, rsock))
	srcSeen := src.waitStatus("completed")
	dstSeen := dst2.waitStatus("completed")
	for _, c := range []struct {
		side       string
		seen, want []string
	}{
		{"source", srcSeen, []string{"postcopy-active", "postcopy-paused", "postcopy-recover-setup", "postcopy-recover", "postcopy-active", "completed"}},
		{"reattached destination", dstSeen, []string{"postcopy-recover", "postcopy-active", "completed"}},
	} {
		i := 0
		for _, s := range c.seen {
			if i < len(c.want) && s == c.want[i] {
				i++
			}
		}
		if i != len(c.want) {
			t.Errorf("%s: MIGRATION events %v, want %v in order", c.side, c.seen, c.want)
		}
	}
	dst2.ok(`{"execute":"stop"}`)
	sd, dd := src.digest(), dst2.digest()
	if sd[:8] != dd[:8] {
		t.Fatalf("RAM digests differ: source %s, destination %s", sd, dd)
	}
	// The reader's view, from the guest process itself: every page
	// received, none ever read as zeros.
	killServe(t, dst2)
	st = guestStats(t, gsock, true)
	if st.LostReads != 0 || st.Received != st.Pages {
		t.Fatalf("the guest process at the end: %+v; want every page received, no lost read (first: %s)", st, st.FirstLost)
	}
}

// serve refuses --reattach and socket= where they cannot work, as usage
// errors naming what to change, before anything is started.
func TestServeReattachUsage(t *testing.T) {
	sock := "unix:" + filepath.Join(t.TempDir(), "q.sock")
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--reattach", "unix:/nonexistent/guest.sock"}, "add --destination"},
		{[]string{"--destination", "--reattach", "unix:/nonexistent/guest.sock", "--guest=size=8M"}, "drop --guest"},
		{[]string{"--destination", "--reattach", "unix:/nonexistent/guest.sock", "-S"}, "drop -S"},
		{[]string{"--destination", "--reattach", "tcp:127.0.0.1:1"}, "unix:PATH"},
		{[]string{"--guest=size=8M,socket=/tmp/x.sock"}, "add postcopy=on"},
	} {
		_, stderr, code := run(t, append([]string{"serve", "--qmp", sock}, c.args...)...)
		if code != exitUsage || !strings.Contains(stderr, c.want) {
			t.Errorf("serve %v: exit %d, %q; want exit %d naming %q", c.args, code, stderr, exitUsage, c.want)
		}
	}
}
