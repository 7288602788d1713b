package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spf13/cobra"
)

// qmpRoot builds a root command with only the QMP commands, so these tests
// do not depend on what main.go registers.
func qmpRoot() *cobra.Command {
	root := &cobra.Command{Use: "migctl", SilenceUsage: true, SilenceErrors: true}
	root.PersistentFlags().String("spec", "", "")
	addQMPCommands(root)
	return root
}

// qmpCLI runs one migctl command in process and returns its output and
// exit status (as main would compute it).
func qmpCLI(t *testing.T, ctx context.Context, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var o, e bytes.Buffer
	root := qmpRoot()
	root.SetArgs(args)
	root.SetOut(&o)
	root.SetErr(&e)
	err := root.ExecuteContext(ctx)
	var ee *exitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.code
	default:
		e.WriteString(err.Error())
		code = 1
	}
	return o.String(), e.String(), code
}

// qmpServe runs `migctl serve` in a goroutine until ctx ends or it quits;
// it returns once the server listens, and a func that waits for its end.
func qmpServe(t *testing.T, ctx context.Context, args ...string) (banner string, wait func() (string, int)) {
	t.Helper()
	pr, pw := io.Pipe()
	var e bytes.Buffer
	var code int
	done := make(chan struct{})
	root := qmpRoot()
	root.SetArgs(append([]string{"serve"}, args...))
	root.SetOut(pw)
	root.SetErr(&e)
	go func() {
		defer close(done)
		err := root.ExecuteContext(ctx)
		var ee *exitError
		if errors.As(err, &ee) {
			code = ee.code
		} else if err != nil {
			e.WriteString(err.Error())
			code = 1
		}
		pw.Close()
	}()
	sc := bufio.NewScanner(pr)
	if !sc.Scan() {
		<-done
		t.Fatalf("serve %v did not start: %s", args, e.String())
	}
	banner = sc.Text()
	go io.Copy(io.Discard, pr)
	return banner, func() (string, int) {
		<-done
		return e.String(), code
	}
}

func TestQMPCommandLine(t *testing.T) {
	dir, err := os.MkdirTemp("", "qmpcli")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	srcSock, dstSock := filepath.Join(dir, "src.sock"), filepath.Join(dir, "dst.sock")
	guestArg := "size=16M,dirty-rate=4M,seed=5"
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dstCtx, stopDst := context.WithCancel(ctx)
	defer stopDst()

	banner, waitSrc := qmpServe(t, ctx, "--qmp", "unix:"+srcSock, "--qmp", "tcp:127.0.0.1:0", "--guest", guestArg)
	if !strings.Contains(banner, srcSock) || !strings.Contains(banner, "source") {
		t.Fatalf("serve banner: %q", banner)
	}
	_, waitDst := qmpServe(t, dstCtx, "--qmp", "unix:"+dstSock, "--guest", guestArg, "--destination")

	out, errOut, code := qmpCLI(t, ctx, "incoming", "-s", dstSock, "tcp:127.0.0.1:0", "--exit-on-error=false")
	m := regexp.MustCompile(`listening on (tcp:127\.0\.0\.1:\d+)`).FindStringSubmatch(out)
	if code != 0 || m == nil || strings.HasSuffix(m[1], ":0") {
		t.Fatalf("incoming: %d %q %q", code, out, errOut)
	}
	uri := m[1]

	// Errors come back as the server gave them, exit status 1.
	_, errOut, code = qmpCLI(t, ctx, "set-param", "-s", srcSock, "downtime-limit=99999999")
	if code != 1 || !strings.Contains(errOut, "downtime-limit") {
		t.Fatalf("bad set-param: %d %q", code, errOut)
	}
	_, errOut, code = qmpCLI(t, ctx, "set-cap", "-s", "unix:"+srcSock, "zero-blocks=on")
	if code != 1 || strings.TrimSpace(errOut) != "Parameter 'capabilities[0].capability' does not accept value 'zero-blocks' (query-migrate-capabilities lists the capabilities)" {
		t.Fatalf("bad set-cap: %d %q", code, errOut)
	}
	if _, _, code = qmpCLI(t, ctx, "set-cap", "-s", srcSock, "events=on", "return-path=off"); code != 0 {
		t.Fatal("set-cap failed")
	}
	if _, errOut, code = qmpCLI(t, ctx, "set-param", "-s", srcSock, "downtime-limit=400", "cpu-throttle-tailslow=on", "tls-creds="); code != 0 {
		t.Fatalf("set-param: %q", errOut)
	}
	out, _, _ = qmpCLI(t, ctx, "qmp", "-s", srcSock, `{"execute":"query-migrate-parameters","id":7}`)
	if !strings.Contains(out, `"downtime-limit":400`) || !strings.Contains(out, `"cpu-throttle-tailslow":true`) || !strings.Contains(out, `"id":7`) {
		t.Fatalf("raw query-migrate-parameters: %s", out)
	}
	out, _, code = qmpCLI(t, ctx, "qmp", "-s", srcSock, `{"execute":"no-such"}`)
	if code != 1 || !strings.Contains(out, `"class":"CommandNotFound"`) {
		t.Fatalf("raw unknown command: %d %s", code, out)
	}

	// Events stream while the migration runs; the events command says on
	// stderr when it is connected.
	evCtx, stopEv := context.WithCancel(ctx)
	evR, evW := io.Pipe()
	readyR, readyW := io.Pipe()
	var evWG sync.WaitGroup
	evWG.Go(func() {
		root := qmpRoot()
		root.SetArgs([]string{"events", "-s", srcSock})
		root.SetOut(evW)
		root.SetErr(readyW)
		root.ExecuteContext(evCtx)
		evW.Close()
		readyW.Close()
	})
	if l, err := bufio.NewReader(readyR).ReadString('\n'); err != nil || !strings.Contains(l, "connected") {
		t.Fatalf("events did not connect: %q %v", l, err)
	}
	go io.Copy(io.Discard, readyR)

	out, errOut, code = qmpCLI(t, ctx, "migrate", "-s", srcSock, uri, "--param", "max-bandwidth=0", "--cap", "events=on")
	if code != 0 || !strings.Contains(out, "completed") {
		t.Fatalf("migrate: %d\n%s\n%s", code, out, errOut)
	}
	t.Logf("migrate printed:\n%s", out)
	sawCompleted := false
	sc := bufio.NewScanner(evR)
	for sc.Scan() {
		if strings.Contains(sc.Text(), `"event":"MIGRATION"`) && strings.Contains(sc.Text(), `"status":"completed"`) {
			sawCompleted = true
			break
		}
	}
	stopEv()
	go io.Copy(io.Discard, evR)
	evWG.Wait()
	if !sawCompleted {
		t.Fatal("events did not print MIGRATION completed")
	}

	out, _, _ = qmpCLI(t, ctx, "status", "-s", dstSock, "-o", "json")
	if !strings.Contains(out, `"status": "completed"`) {
		t.Fatalf("status -o json: %s", out)
	}
	out, _, _ = qmpCLI(t, ctx, "status", "-s", srcSock)
	if !regexp.MustCompile(`status\s+completed`).MatchString(out) || !regexp.MustCompile(`guest\s+postmigrate`).MatchString(out) ||
		!strings.Contains(out, "transferred") {
		t.Fatalf("status table:\n%s", out)
	}
	if _, _, code = qmpCLI(t, ctx, "cancel", "-s", srcSock); code != 0 {
		t.Fatal("cancel after completion failed")
	}
	// A failed migration exits 1 with the error: the destination now runs
	// the guest and migrates it to nowhere.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := "tcp:" + ln.Addr().String()
	ln.Close()
	_, errOut, code = qmpCLI(t, ctx, "migrate", "-s", dstSock, dead)
	if code != 1 || !strings.Contains(errOut, "migration failed") {
		t.Fatalf("migrate to nowhere: %d %q", code, errOut)
	}
	_, errOut, code = qmpCLI(t, ctx, "status")
	if code != 1 || !strings.Contains(errOut, "-s PATH") {
		t.Fatalf("status without a socket: %d %q", code, errOut)
	}

	// quit ends the source; SIGINT (here: the context) ends the
	// destination; both remove their sockets.
	if _, _, code = qmpCLI(t, ctx, "qmp", "-s", srcSock, `{"execute":"quit"}`); code != 0 {
		t.Fatal("quit failed")
	}
	if errOut, code := waitSrc(); code != 0 {
		t.Fatalf("source serve: %d %s", code, errOut)
	}
	stopDst()
	if errOut, code := waitDst(); code != 0 {
		t.Fatalf("destination serve: %d %s", code, errOut)
	}
	for _, s := range []string{srcSock, dstSock} {
		if _, err := os.Lstat(s); !os.IsNotExist(err) {
			t.Fatalf("%s left behind: %v", s, err)
		}
	}
}
