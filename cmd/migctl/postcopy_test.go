package main

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"testing"

	"github.com/migctl/migctl/uffd"
)

// postcopyInfo is the part of query-migrate postcopy fills (QEMU's names).
type postcopyInfo struct {
	Status string `json:"status"`
	RAM    *struct {
		PostcopyRequests uint64 `json:"postcopy-requests"`
		PostcopyBytes    uint64 `json:"postcopy-bytes"`
	} `json:"ram"`
	PostcopyBlocktime     *uint32  `json:"postcopy-blocktime"`
	PostcopyVCPUBlocktime []uint32 `json:"postcopy-vcpu-blocktime"`
}

func (p *serveProc) postcopyInfo() postcopyInfo {
	p.t.Helper()
	var i postcopyInfo
	if err := json.Unmarshal(p.ok(`{"execute":"query-migrate"}`), &i); err != nil {
		p.t.Fatal(err)
	}
	return i
}

// Postcopy between two `migctl serve` processes, each guest in a guest
// process of its own (--guest …,postcopy=on), driven only over QMP by
// go-qemu as a QEMU pair is: migrate-set-capabilities postcopy-ram on both
// sides, migrate, migrate-start-postcopy while pass 1 is far from done
// (max-bandwidth holds it back). Both sides report QEMU's MIGRATION
// states, the source's query-migrate counts the page requests it served,
// the destination's reports postcopy-blocktime with one entry per reader
// vCPU, and the RAM of
// the two guests ends identical.
func TestServePostcopyOverQMP(t *testing.T) {
	if err := uffd.Probe(); err != nil {
		t.Skipf("postcopy needs userfaultfd: %v", err)
	}
	src := startServe(t, "src", "--guest=size=32M,dirty-rate=64M,seed=5,postcopy=on")
	// The destination's guest only reads (no writer): its RAM must end as
	// the source's.
	dst := startServe(t, "dst", "--guest=size=32M,dirty-rate=0,seed=5,postcopy=on,readers=2", "--destination")
	for _, p := range []*serveProc{src, dst} {
		// quit (before the kill of startServe's cleanup) lets serve end
		// its guest process.
		t.Cleanup(func() { p.run(`{"execute":"quit"}`); p.cmd.Wait() })
		p.ok(`{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"postcopy-ram","state":true},{"capability":"postcopy-blocktime","state":true}]}}`)
	}
	// Before any migration, QEMU's refusal.
	src.refused(`{"execute":"migrate-start-postcopy"}`, "Postcopy must be started after migration has been started")
	dst.ok(`{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0","exit-on-error":false}}`)
	port := listenPort(t, dst.info())
	src.ok(`{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":8388608}}`)
	src.ok(fmt.Sprintf(`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:%s"}}`, port))
	src.waitStatus("active")
	src.ok(`{"execute":"migrate-start-postcopy"}`)
	src.waitStatus("postcopy-active")
	srcSeen := src.waitStatus("completed")
	dstSeen := dst.waitStatus("completed")
	for _, c := range []struct {
		side       string
		seen, want []string
	}{
		{"source", srcSeen, []string{"setup", "active", "device", "postcopy-device", "postcopy-active", "completed"}},
		{"destination", dstSeen, []string{"setup", "active", "postcopy-device", "postcopy-active", "completed"}},
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
		if slices.Contains(c.seen, "failed") {
			t.Errorf("%s: MIGRATION events %v include failed", c.side, c.seen)
		}
	}
	si := src.postcopyInfo()
	if si.Status != "completed" || si.RAM == nil || si.RAM.PostcopyRequests == 0 || si.RAM.PostcopyBytes == 0 {
		t.Fatalf("source query-migrate: %+v %+v: want completed with postcopy requests served and postcopy bytes", si, si.RAM)
	}
	di := dst.postcopyInfo()
	if di.PostcopyBlocktime == nil || len(di.PostcopyVCPUBlocktime) != 2 {
		t.Fatalf("destination query-migrate: postcopy-blocktime %v, postcopy-vcpu-blocktime %v; want both, one entry per reader", di.PostcopyBlocktime, di.PostcopyVCPUBlocktime)
	}
	// The guest runs on the destination only; stop it to compare. The
	// digest's high 32 bits cover RAM; the low ones cover devices, whose
	// virtual clock ran on at the destination.
	dst.ok(`{"execute":"stop"}`)
	sd, dd := src.digest(), dst.digest()
	if sd[:8] != dd[:8] {
		t.Fatalf("RAM digests differ: source %s, destination %s", sd, dd)
	}
	t.Logf("source served %d requests (%d postcopy bytes); destination blocktime %d ms, per vCPU %v ms", si.RAM.PostcopyRequests, si.RAM.PostcopyBytes, *di.PostcopyBlocktime, di.PostcopyVCPUBlocktime)
}

// migrate-pause, migrate-recover and migrate resume=true over QMP with
// QEMU's shapes, between two `migctl serve` processes driven by go-qemu:
// the source's migrate-pause in postcopy-active takes both sides to
// postcopy-paused (MIGRATION events), migrate_cancel is refused there with
// QEMU's message, migrate-recover on the destination and migrate
// resume=true on the source finish the migration through
// postcopy-recover-setup and postcopy-recover, with equal RAM.
func TestServePostcopyPauseRecoverOverQMP(t *testing.T) {
	if err := uffd.Probe(); err != nil {
		t.Skipf("postcopy needs userfaultfd: %v", err)
	}
	src := startServe(t, "src", "--guest=size=32M,dirty-rate=64M,seed=6,postcopy=on")
	dst := startServe(t, "dst", "--guest=size=32M,dirty-rate=0,seed=6,postcopy=on,readers=1", "--destination")
	for _, p := range []*serveProc{src, dst} {
		t.Cleanup(func() { p.run(`{"execute":"quit"}`); p.cmd.Wait() })
		p.ok(`{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"postcopy-ram","state":true}]}}`)
	}
	// Not paused yet: QEMU's refusals.
	dst.refused(`{"execute":"migrate-recover","arguments":{"uri":"tcp:127.0.0.1:0"}}`, "Migrate recover can only be run when postcopy is paused.")
	dst.ok(`{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0","exit-on-error":false}}`)
	port := listenPort(t, dst.info())
	// The background stream crawls so that the pause finds pages missing.
	src.ok(`{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":8388608,"max-postcopy-bandwidth":1048576}}`)
	src.ok(fmt.Sprintf(`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:%s"}}`, port))
	src.waitStatus("active")
	src.refused(`{"execute":"migrate-pause"}`, "migrate-pause is currently only supported during postcopy-active or postcopy-recover state")
	src.ok(`{"execute":"migrate-start-postcopy"}`)
	src.waitStatus("postcopy-active")
	src.ok(`{"execute":"migrate-pause"}`)
	src.waitStatus("postcopy-paused")
	dst.waitStatus("postcopy-paused")
	if st := src.postcopyInfo().Status; st != "postcopy-paused" {
		t.Fatalf("source query-migrate status %q after migrate-pause", st)
	}
	src.refused(`{"execute":"migrate_cancel"}`, "Postcopy migration in progress, cannot cancel.")
	src.refused(`{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:1"}}`) // a new migration: one is paused
	rsock := filepath.Join(t.TempDir(), "recover.sock")
	dst.ok(fmt.Sprintf(`{"execute":"migrate-recover","arguments":{"uri":"unix:%s"}}`, rsock))
	src.ok(`{"execute":"migrate-set-parameters","arguments":{"max-postcopy-bandwidth":0}}`)
	src.ok(fmt.Sprintf(`{"execute":"migrate","arguments":{"uri":"unix:%s","resume":true}}`, rsock))
	srcSeen := src.waitStatus("completed")
	dstSeen := dst.waitStatus("completed")
	for _, c := range []struct {
		side       string
		seen, want []string
	}{
		{"source", srcSeen, []string{"postcopy-active", "postcopy-paused", "postcopy-recover-setup", "postcopy-recover", "postcopy-active", "completed"}},
		{"destination", dstSeen, []string{"postcopy-active", "postcopy-paused", "postcopy-recover", "postcopy-active", "completed"}},
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
	dst.ok(`{"execute":"stop"}`)
	sd, dd := src.digest(), dst.digest()
	if sd[:8] != dd[:8] {
		t.Fatalf("RAM digests differ: source %s, destination %s", sd, dd)
	}
}
