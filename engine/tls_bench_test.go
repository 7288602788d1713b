package engine_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/migctl/migctl/creds"
	"github.com/migctl/migctl/engine"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/loaders"
	"github.com/migctl/migctl/machine"
)

// BenchmarkTLSThroughput migrates an idle guest (1 GiB of random content,
// nothing dirtied; MIGCTL_BENCH_SIZE overrides the size) over loopback
// tcp: in-process, once in plaintext and once with mutual TLS (x509
// credentials made for the run, TLS 1.3 as crypto/tls negotiates it), in
// each iteration; the order alternates between iterations (plaintext
// first, then TLS first) so that neither always runs on a warmer or a
// busier machine.
//
// The clock of one migration starts just before engine.Start — the
// destination is already listening and has pre-faulted its RAM, the
// source's controller and credentials are ready — and stops when both the
// source's Wait and the destination's Wait have returned completed. So it
// includes dialling, the TLS handshake (TLS runs only), the whole stream,
// the switchover and the commit protocol; it excludes building the
// guests, the controllers, the credentials and the destination's
// pre-faulting.
//
// Reported: plain-GB/s and tls-GB/s (the guest's RAM over the median
// time of each), and tls/plain, the median of the iterations' paired
// ratios (plaintext time over TLS time: 1 means TLS costs nothing; the
// goal on a machine with AES-NI is ≥ 0.8). ns/op covers both migrations
// and the setup around them: do not read it.
//
// The channels are not wrapped to check what crosses them (a wrapper would
// sit on the measured path); TestTLSMigration checks, through a proxy, that
// this configuration (engine.Options.Creds, loaders.Options.Creds,
// tls-creds on both sides) puts every channel in TLS.
func BenchmarkTLSThroughput(b *testing.B) {
	size := benchSize(b, 1<<30)
	cfg := guest.Config{Size: size, Seed: 13, Random: true, VRAM: -1}
	p := newPKI(b)
	srcObjs, dstObjs := creds.NewObjects(), creds.NewObjects()
	if err := srcObjs.Add(json.RawMessage(clientCreds(p.client, ""))); err != nil {
		b.Fatal(err)
	}
	if err := dstObjs.Add(json.RawMessage(serverCreds(p.server))); err != nil {
		b.Fatal(err)
	}
	g, err := guest.New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer g.Close()
	var plain, secure []time.Duration
	var ratios []float64
	for i := 0; b.Loop(); i++ {
		var took [2]time.Duration // [0] plaintext, [1] TLS
		for j := range 2 {
			tls := (i+j)%2 == 1
			d := tlsMigrateTimed(b, g, cfg, srcObjs, dstObjs, tls)
			if tls {
				took[1] = d
			} else {
				took[0] = d
			}
		}
		plain, secure = append(plain, took[0]), append(secure, took[1])
		ratios = append(ratios, took[0].Seconds()/took[1].Seconds())
	}
	slices.Sort(plain)
	slices.Sort(secure)
	slices.Sort(ratios)
	mp, ms, r := plain[len(plain)/2], secure[len(secure)/2], ratios[len(ratios)/2]
	b.ReportMetric(float64(size)/mp.Seconds()/1e9, "plain-GB/s")
	b.ReportMetric(float64(size)/ms.Seconds()/1e9, "tls-GB/s")
	b.ReportMetric(r, "tls/plain")
	fmt.Fprintf(os.Stderr, "tls-throughput size=%d MiB: plaintext %.2f GB/s (median %v), TLS %.2f GB/s (median %v), paired ratio tls/plain median %.2f (all %.2f)\n",
		size>>20, float64(size)/mp.Seconds()/1e9, mp, float64(size)/ms.Seconds()/1e9, ms, r, ratios)
}

// tlsMigrateTimed migrates g to a fresh destination over loopback tcp:,
// with TLS when tls is set, and returns the time on the benchmark's clock
// (see BenchmarkTLSThroughput). The source gets a fresh controller, so
// that g can be migrated again.
func tlsMigrateTimed(b *testing.B, g *guest.Builtin, cfg guest.Config, srcObjs, dstObjs *creds.Objects, tls bool) time.Duration {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	params := map[string]any{"max-bandwidth": 0, "downtime-limit": 2000}
	if tls {
		params["tls-creds"] = "tls0"
	}
	dg, err := guest.NewDestination(cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer dg.Close()
	dc, err := machine.New(defaultSpec(b), machine.Options{
		Facts: map[string]string{"page-size": "4096", "guest": dg.ID()}, Incoming: true, Objects: guardObjects(dstObjs)})
	if err != nil {
		b.Fatal(err)
	}
	defer dc.Close()
	stayPaused(b, dc)
	sc, err := machine.New(defaultSpec(b), machine.Options{
		Facts: map[string]string{"page-size": "4096", "guest": g.ID()}, Objects: guardObjects(srcObjs)})
	if err != nil {
		b.Fatal(err)
	}
	defer sc.Close()
	for _, c := range []*machine.Controller{sc, dc} {
		if err := c.SetParameters(ctx, params); err != nil {
			b.Fatal(err)
		}
	}
	in, err := loaders.Listen(ctx, dc, dg, "tcp:127.0.0.1:0", loaders.Options{Creds: dstObjs})
	if err != nil {
		b.Fatal(err)
	}
	select {
	case <-in.Prefaulted():
	case <-ctx.Done():
		in.Abort("the benchmark timed out")
		b.Fatal("the destination did not pre-fault its RAM in time")
	}
	start := time.Now()
	m, err := engine.Start(ctx, sc, g, in.Addr().String(), engine.Options{Creds: srcObjs})
	if err != nil {
		in.Abort("the source refused")
		<-in.Done()
		b.Fatal(err)
	}
	sr, serr := m.Wait(ctx)
	dr, derr := in.Wait(ctx)
	took := time.Since(start)
	if serr != nil || derr != nil || sr.Err != nil || dr.Err != nil {
		b.Fatalf("tls=%v: source %s %v %v, destination %s %v %v", tls, sr.State, serr, sr.Err, dr.State, derr, dr.Err)
	}
	return took
}
