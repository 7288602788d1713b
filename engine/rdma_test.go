package engine_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/rdma"
	"github.com/migctl/migctl/rdma/fault"
	"github.com/migctl/migctl/rdma/soft"
	"github.com/migctl/migctl/rdma/verbs"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/transport"
)

// providerSeq makes the registry names of the tests' providers unique.
var providerSeq atomic.Int64

// faultProvider registers a fault-injecting wrapper of the soft provider in
// rdma's registry and returns its name and the wrapper.
func faultProvider(t *testing.T, cfg fault.Config) (string, *fault.Provider) {
	t.Helper()
	fp := fault.Wrap(soft.New(soft.Options{}), cfg)
	name := fmt.Sprintf("test-fault-%d", providerSeq.Add(1))
	rdma.Register(name, func() (verbs.Provider, error) { return fp, nil })
	return name, fp
}

// migrateRDMA is migrate over rdma:, each side on the provider registered
// under its name (the operator's --rdma-provider).
func migrateRDMA(t *testing.T, src, dst *end, listenURI, srcProvider, dstProvider string) (engine.Result, loaders.Result) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	in, err := loaders.Listen(ctx, dst.c, dst.g, listenURI, loaders.Options{PageSums: true, Transport: &transport.Config{RDMAProvider: dstProvider}})
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	m, err := engine.Start(ctx, src.c, src.g, in.Addr().String(), engine.Options{Transport: &transport.Config{RDMAProvider: srcProvider}})
	if err != nil {
		in.Abort("source refused")
		in.Wait(ctx)
		t.Fatalf("migrate: %v", err)
	}
	sr, err := m.Wait(ctx)
	if err != nil {
		_ = m.Cancel(context.Background())
		in.Abort("test timed out")
		<-m.Done()
		<-in.Done()
		t.Fatalf("the migration did not end in time: %v", err)
	}
	dr, err := in.Wait(ctx)
	if err != nil {
		in.Abort("test timed out")
		<-in.Done()
		t.Fatalf("the destination did not end in time: %v", err)
	}
	return sr, dr
}

// The built-in guest's blocks (pc.ram testSize, vga.vram 1 MiB) in 1 MiB
// chunks, and the destination's registrations the rdma: transport makes
// for them: the control arena, then every block up front (pin-all) or
// each chunk on its first write (on demand; every chunk of pc.ram holds
// data with ZeroFraction 0.1).
const (
	testBlocks      = 2
	testChunks      = testSize>>20 + guest.DefaultVRAM>>20
	arenaRegs       = 1
	pinAllDestRegs  = arenaRegs + testBlocks
	onDemandMinRegs = arenaRegs + testSize>>20
)

// Over the software RDMA provider, v4 and v6, with and without
// rdma-pin-all, the guest dirtying memory throughout: the destination's
// memory equals the source's, the pages travelled by RDMA WRITE (no RAM
// record on the stream), the page sums the loader computed from memory
// make the same digest, and registration followed rdma-pin-all.
func TestMigrateRDMA(t *testing.T) {
	for _, uri := range []string{"rdma:127.0.0.1:0", "rdma:[::1]:0"} {
		for _, pinAll := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/pin-all=%v", uri, pinAll), func(t *testing.T) {
				if strings.Contains(uri, "::1") {
					skipWithoutIPv6(t)
				}
				src := newEnd(t, false, guestCfg())
				dst := newEnd(t, true, guestCfg())
				if err := src.c.SetCapabilities(context.Background(), map[string]bool{"rdma-pin-all": pinAll}); err != nil {
					t.Fatal(err)
				}
				dname, dfp := faultProvider(t, fault.Config{})
				sr, dr := migrateRDMA(t, src, dst, uri, "soft", dname)
				if sr.State != "completed" || dr.State != "completed" {
					t.Fatalf("source %s (%v), destination %s (%v)", sr.State, sr.Err, dr.State, dr.Err)
				}
				want := checksum(t, src.g)
				if got := checksum(t, dst.g); got != want {
					t.Fatalf("destination checksum %#x, source %#x", got, want)
				}
				if err := dst.g.Verify(); err != nil {
					t.Fatalf("destination memory: %v", err)
				}
				d, err := dst.g.DigestWithPageSums(dr.PageSums)
				if err != nil || d.Sum() != want {
					t.Fatalf("digest from the loader's page sums %#x (%v), want %#x", d.Sum(), err, want)
				}
				if dr.Wire != (loaders.Wire{}) {
					t.Errorf("pages travelled on the stream: %+v; over RDMA the stream carries none", dr.Wire)
				}
				if ram := uint64(testSize + guest.DefaultVRAM); sr.Stats.Transferred < ram/2 || dr.Stats.Transferred > ram/16 {
					t.Errorf("source moved %d bytes, the destination's stream carried %d: want the RAM (%d bytes, some zero) outside the stream", sr.Stats.Transferred, dr.Stats.Transferred, ram)
				}
				if sr.Stats.MultifdBytes != 0 {
					t.Errorf("multifd-bytes %d over rdma", sr.Stats.MultifdBytes)
				}
				if sr.Stats.RDMAProvider != "soft" || !strings.HasPrefix(dr.Stats.RDMAProvider, "fault(soft") {
					t.Errorf("providers named: source %q, destination %q", sr.Stats.RDMAProvider, dr.Stats.RDMAProvider)
				}
				regs := dfp.Registrations()
				if pinAll && regs != pinAllDestRegs {
					t.Errorf("pin-all: the destination registered %d times, want %d (its control arena and each block once)", regs, pinAllDestRegs)
				}
				if !pinAll && (regs < onDemandMinRegs || regs > arenaRegs+testChunks) {
					t.Errorf("on demand: the destination registered %d times, want %d..%d (its arena, then chunk by chunk)", regs, onDemandMinRegs, arenaRegs+testChunks)
				}
				t.Logf("passes %d, downtime %v, total %v, transferred %d, destination registrations %d", sr.Stats.DirtySyncCount, sr.Stats.Downtime, sr.Stats.TotalTime, sr.Stats.Transferred, regs)
			})
		}
	}
}

func skipWithoutIPv6(t *testing.T) {
	t.Helper()
	l, err := transport.Listen(context.Background(), transport.Addr{Scheme: transport.SchemeTCP, Host: "::1"})
	if err != nil {
		t.Skipf("no IPv6 loopback on this machine: %v", err)
	}
	l.Close()
}

// Issue 10's scenario (b) at the engine: the source announces return-path
// on, the destination has it off. The connect guard refuses, both sides
// fail naming the capability and rdma, and the destination's RAM was never
// opened to the source: nothing but its control arena was registered (so
// not one RDMA WRITE could land, even with pin-all) and its memory is as
// it was.
func TestRDMAConnectRefusedWritesNothing(t *testing.T) {
	for _, pinAll := range []bool{false, true} {
		t.Run(fmt.Sprintf("pin-all=%v", pinAll), func(t *testing.T) {
			src := newEnd(t, false, guestCfg())
			dst := newEnd(t, true, guestCfg())
			if err := src.c.SetCapabilities(context.Background(), map[string]bool{"return-path": true, "rdma-pin-all": pinAll}); err != nil {
				t.Fatal(err)
			}
			before := checksum(t, dst.g)
			sname, sfp := faultProvider(t, fault.Config{})
			dname, dfp := faultProvider(t, fault.Config{})
			sr, dr := migrateRDMA(t, src, dst, "rdma:127.0.0.1:0", sname, dname)
			if sr.State != "failed" || dr.State != "failed" {
				t.Fatalf("source %s (%v), destination %s (%v)", sr.State, sr.Err, dr.State, dr.Err)
			}
			for side, err := range map[string]error{"source": sr.Err, "destination": dr.Err} {
				if err == nil || !strings.Contains(err.Error(), "return-path") || !strings.Contains(err.Error(), "source has it on") || !strings.Contains(err.Error(), "rdma:127.0.0.1:") {
					t.Errorf("%s: %v; want the reason naming return-path and the rdma: address", side, err)
				}
			}
			t.Logf("source: %v\ndestination: %v", sr.Err, dr.Err)
			if n := dfp.Registrations(); n != arenaRegs {
				t.Errorf("the destination registered %d regions, want %d (its control arena only: guest RAM stays closed until connect passes)", n, arenaRegs)
			}
			if n := sfp.Writes(); n != 0 {
				t.Errorf("the source posted %d RDMA WRITEs to a destination that refused it", n)
			}
			if after := checksum(t, dst.g); after != before {
				t.Errorf("the destination's memory changed (%#x → %#x)", before, after)
			}
			sourceIntact(t, src)
		})
	}
}

// sourceIntact checks the source guest runs again after a failure and its
// memory is consistent (the engine only ever read it).
func sourceIntact(t *testing.T, src *end) {
	t.Helper()
	if !src.g.Running() {
		t.Fatal("the source guest is not running after the failure")
	}
	src.g.Stop()
	defer src.g.Start()
	if err := src.g.Verify(); err != nil {
		t.Fatalf("source memory after the failure: %v", err)
	}
	st, _ := src.c.Status(spec.Outgoing, 0)
	if st.Error == "" {
		t.Error("the source's error-desc is empty")
	}
}

// Faults of the RDMA data path (rdma/fault) fail both sides cleanly: the
// migration ends failed on each with a reason, and the source guest runs
// with its memory intact.
func TestRDMAFaults(t *testing.T) {
	cases := []struct {
		name     string
		srcFault fault.Config // on the source's provider
		dstFault fault.Config // on the destination's
		pinAll   bool
		src, dst string // in each side's error
	}{
		{
			// The 5th WRITE is aimed 2 MiB further: into a chunk its key
			// does not cover (on demand), or past the block (pin-all).
			name: "write outside a registered region", srcFault: fault.Config{CorruptWrite: 5, Shift: 2 << 20},
			src: "destination refused an RDMA WRITE", dst: "refused an RDMA WRITE from the source",
		},
		{
			name: "write outside a registered region/pin-all", srcFault: fault.Config{CorruptWrite: 5, Shift: 64 << 20}, pinAll: true,
			src: "destination refused an RDMA WRITE", dst: "refused an RDMA WRITE from the source",
		},
		{
			// Destination registrations: 1 the control arena, 2.. chunks.
			name: "failed registration", dstFault: fault.Config{FailRegister: 4},
			src: "fault injected", dst: "fault injected",
		},
		{
			name: "failed registration/pin-all", dstFault: fault.Config{FailRegister: 2}, pinAll: true,
			src: "pin-all", dst: "fault injected",
		},
		{
			name: "dropped completion", srcFault: fault.Config{DropCompletion: 3, DropOp: verbs.OpWrite},
			src: "was lost", dst: "was lost",
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			src := newEnd(t, false, guestCfg())
			dst := newEnd(t, true, guestCfg())
			if err := src.c.SetCapabilities(context.Background(), map[string]bool{"rdma-pin-all": c.pinAll}); err != nil {
				t.Fatal(err)
			}
			sname, _ := faultProvider(t, c.srcFault)
			dname, _ := faultProvider(t, c.dstFault)
			sr, dr := migrateRDMA(t, src, dst, "rdma:127.0.0.1:0", sname, dname)
			if sr.State != "failed" || dr.State != "failed" {
				t.Fatalf("source %s (%v), destination %s (%v); want both failed", sr.State, sr.Err, dr.State, dr.Err)
			}
			if sr.Err == nil || !strings.Contains(sr.Err.Error(), c.src) {
				t.Errorf("source: %v; want it to say %q", sr.Err, c.src)
			}
			if dr.Err == nil || !strings.Contains(dr.Err.Error(), c.dst) {
				t.Errorf("destination: %v; want it to say %q", dr.Err, c.dst)
			}
			t.Logf("source: %v\ndestination: %v", sr.Err, dr.Err)
			if errors.Is(sr.Err, engine.ErrCancelled) {
				t.Errorf("source: %v reads as a cancel", sr.Err)
			}
			sourceIntact(t, src)
		})
	}
}

// A destination on the verbs provider, on a host without an RDMA device
// (or a binary built without rdma-core), fails to listen with the reason,
// and never listens on software RDMA instead.
func TestRDMAVerbsNoFallback(t *testing.T) {
	if _, err := rdma.Open(context.Background(), "verbs"); err == nil {
		t.Skip("an RDMA device is present here: this test covers hosts without one")
	}
	dst := newEnd(t, true, guestCfg())
	_, err := loaders.Listen(context.Background(), dst.c, dst.g, "rdma:127.0.0.1:0", loaders.Options{})
	var pe *rdma.ProviderError
	if !errors.As(err, &pe) || pe.Name != "verbs" || !strings.Contains(err.Error(), "never falls back") {
		t.Fatalf("listen over verbs: %v; want a ProviderError naming verbs", err)
	}
	st, _ := dst.c.Status(spec.Incoming, 0)
	if st.State != "none" {
		t.Errorf("the incoming side is %s after the failed listen, want none (listen-failed)", st.State)
	}
}
