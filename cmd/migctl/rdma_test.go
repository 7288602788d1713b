package main

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/digitalocean/go-qemu/qmp/raw"
)

// freePort returns a TCP port of host that was free a moment ago. rdma:
// has no socket-address in query-migrate (neither has QEMU's), so the
// tests choose the port, as an operator does (rdma:0.0.0.0:4444).
func freePort(t *testing.T, host string) string {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Skipf("no loopback %s here: %v", host, err)
	}
	defer ln.Close()
	return fmt.Sprint(ln.Addr().(*net.TCPAddr).Port)
}

// digest is the guest's digest (x-migctl-query-digest; the guest must be
// stopped).
func (p *serveProc) digest() string {
	p.t.Helper()
	var d struct {
		Digest string `json:"digest"`
	}
	if err := json.Unmarshal(p.ok(`{"execute":"x-migctl-query-digest"}`), &d); err != nil || len(d.Digest) != 16 {
		p.t.Fatalf("x-migctl-query-digest: %+v %v", d, err)
	}
	return d.Digest
}

func runState(t *testing.T, p *serveProc) string {
	t.Helper()
	var st struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(p.ok(`{"execute":"query-status"}`), &st); err != nil {
		t.Fatal(err)
	}
	return st.Status
}

// Issue 10's seed scenario between two `migctl serve --rdma-provider soft`
// processes, driven over QMP by go-qemu: (a) a destination listening on
// rdma: refuses mapped-ram at once, naming it and the address; (b) a
// source whose must-match capabilities differ (return-path on the source
// only) is refused at connect, both sides fail naming the capability and
// rdma, and the destination's memory is untouched.
func TestRDMASeedOverQMP(t *testing.T) {
	guest := "--guest=size=16M,dirty-rate=8M,seed=7"
	dst := startServe(t, "dst", guest, "--destination", "--rdma-provider", "soft")
	before := dst.digest()
	uri := "rdma:127.0.0.1:" + freePort(t, "127.0.0.1")

	// (a)
	dst.ok(`{"execute":"migrate-incoming","arguments":{"uri":"` + uri + `","exit-on-error":false}}`)
	info := dst.info()
	if info["status"] != "setup" || info["x-migctl-rdma-provider"] != "soft" || info["socket-address"] != nil {
		t.Fatalf("listening on %s: query-migrate %v; want status setup (QEMU's for listening), x-migctl-rdma-provider soft, no socket-address", uri, info)
	}
	// go-qemu's own MigrationInfo decodes the reply: the x-migctl member is
	// ignored by a client that does not know it.
	mi, err := raw.NewMonitor(dst.mon).QueryMigrate()
	if err != nil || mi.Status == nil || mi.Status.String() != "setup" {
		t.Fatalf("go-qemu QueryMigrate: %+v, %v", mi, err)
	}
	dst.refused(`{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"mapped-ram","state":true}]}}`, "mapped-ram", uri)
	if out, _, code := run(t, "status", "-s", dst.sock); code != 0 || !strings.Contains(out, "rdma provider") || !strings.Contains(out, "soft") {
		t.Errorf("migctl status: exit %d, %q; want the RDMA provider named", code, out)
	}

	// (b)
	src := startServe(t, "src", guest, "--rdma-provider", "soft")
	src.ok(`{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"return-path","state":true}]}}`)
	src.ok(`{"execute":"migrate","arguments":{"uri":"` + uri + `"}}`)
	src.waitStatus("failed")
	dst.waitStatus("failed")
	for name, p := range map[string]*serveProc{"source": src, "destination": dst} {
		info := p.info()
		desc := fmt.Sprint(info["error-desc"])
		for _, want := range []string{"return-path", "source has it on", "destination has it off", uri} {
			if !strings.Contains(desc, want) {
				t.Errorf("%s error-desc %q does not name %q", name, desc, want)
			}
		}
		if info["x-migctl-rdma-provider"] != "soft" {
			t.Errorf("%s query-migrate does not name the provider: %v", name, info)
		}
	}
	if after := dst.digest(); after != before {
		t.Errorf("the destination's memory changed although its connect guard refused the source (digest %s → %s)", before, after)
	}
	if st := runState(t, src); st != "running" {
		t.Errorf("source guest %s after the refusal, want running", st)
	}
}

// Issue 10's scenario (c): full migrations over rdma: between two serve
// processes on software RDMA, v4 and v6, with and without rdma-pin-all,
// the guest dirtying memory throughout: both complete, both name the
// provider, and the destination (told to stay paused) holds exactly the
// source's guest.
func TestRDMAMigrationOverQMP(t *testing.T) {
	for _, host := range []string{"127.0.0.1", "::1"} {
		for _, pinAll := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/pin-all=%v", host, pinAll), func(t *testing.T) {
				port := freePort(t, host)
				guest := "--guest=size=32M,dirty-rate=16M,seed=8"
				src := startServe(t, "src", guest, "--rdma-provider", "soft")
				dst := startServe(t, "dst", guest, "--destination", "--rdma-provider", "soft")
				dst.ok(`{"execute":"stop"}`) // stay paused on arrival, so its memory can be compared
				uri := "rdma:" + net.JoinHostPort(host, port)
				dst.ok(`{"execute":"migrate-incoming","arguments":{"uri":"` + uri + `","exit-on-error":false}}`)
				src.ok(fmt.Sprintf(`{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"rdma-pin-all","state":%v}]}}`, pinAll))
				src.ok(`{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":0}}`)
				src.ok(`{"execute":"migrate","arguments":{"uri":"` + uri + `"}}`)
				src.waitStatus("completed")
				dst.waitStatus("completed")
				for name, p := range map[string]*serveProc{"source": src, "destination": dst} {
					info := p.info()
					if info["status"] != "completed" || info["x-migctl-rdma-provider"] != "soft" {
						t.Errorf("%s: query-migrate %v", name, info)
					}
				}
				if s, d := runState(t, src), runState(t, dst); s != "postmigrate" || d != "paused" {
					t.Fatalf("run states: source %s, destination %s; want postmigrate and paused", s, d)
				}
				if s, d := src.digest(), dst.digest(); s != d {
					t.Fatalf("digests differ: source %s, destination %s", s, d)
				}
			})
		}
	}
}

// The provider is chosen, never guessed: serve defaults to verbs, which on
// a host without an RDMA device (or in a binary without rdma-core) fails
// migrate-incoming with the reason, leaving the destination ready for
// another try; an unknown --rdma-provider is a usage error.
func TestRDMAProviderChosenExplicitly(t *testing.T) {
	dst := startServe(t, "dst", smallGuest, "--destination")
	_, err := dst.run(`{"execute":"migrate-incoming","arguments":{"uri":"rdma:127.0.0.1:0"}}`)
	if err == nil {
		t.Skip("an RDMA device is present here: this test covers hosts without one")
	}
	for _, want := range []string{"provider verbs", "--rdma-provider verbs", "never falls back to soft"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("migrate-incoming over verbs: %q does not say %q", err, want)
		}
	}
	if info := dst.info(); info["status"] != nil {
		t.Errorf("after the failed listen, query-migrate %v; want {} (ready for another migrate-incoming)", info)
	}
	dst.ok(`{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0","exit-on-error":false}}`)
	if info := dst.info(); info["x-migctl-rdma-provider"] != nil {
		t.Errorf("listening on tcp: query-migrate names an RDMA provider: %v", info)
	}

	_, errOut, code := run(t, "serve", "--qmp", "unix:"+filepath.Join(t.TempDir(), "x.sock"), "--rdma-provider", "rxe")
	if code != 2 || !strings.Contains(errOut, `--rdma-provider "rxe": want one of soft, verbs`) {
		t.Errorf("serve --rdma-provider rxe: exit %d, %q", code, errOut)
	}
}

// Built with rdma-core (-tags rdma_verbs, as CI vets it), serve's default
// provider probes for a device: on this machine there is none, and
// migrate-incoming says which probe failed.
func TestRDMAVerbsProbeReason(t *testing.T) {
	if _, err := os.Stat("/usr/include/infiniband/verbs.h"); err != nil {
		t.Skip("needs libibverbs-dev and librdmacm-dev (apt-get install libibverbs-dev librdmacm-dev) to build the verbs provider")
	}
	bin := filepath.Join(t.TempDir(), "migctl-verbs")
	build := exec.Command("go", "build", "-tags", "rdma_verbs", "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build -tags rdma_verbs: %v\n%s", err, out)
	}
	dst := startServeBin(t, bin, "dst", smallGuest, "--destination")
	_, err := dst.run(`{"execute":"migrate-incoming","arguments":{"uri":"rdma:127.0.0.1:0"}}`)
	if err == nil {
		t.Skip("an RDMA device is present here: this test covers hosts without one")
	}
	for _, want := range []string{"no RDMA device", "ibv_get_device_list", "never falls back to soft"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("migrate-incoming over verbs: %q does not say %q", err, want)
		}
	}
}
