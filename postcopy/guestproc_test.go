package postcopy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/guest/proc"
	"github.com/migctl/migctl/uffd"
	"golang.org/x/sys/unix"
)

const mib = 1 << 20

// feeder is the in-memory source: it answers the service's requests from a
// source guest of this process, in arrival order (a faulting page before
// its neighbours), with PlaceRun. With limit > 0 it answers only that many
// urgent requests; at the next one it closes starved and answers nothing
// more, like a migctl that dies with faults outstanding.
type feeder struct {
	src   guest.Guest
	svc   *Service
	limit int

	mu   sync.Mutex // guards q
	q    []Request
	wake chan struct{}

	urgent  int // owned by run
	starved chan struct{}
}

func newFeeder(src guest.Guest, limit int) *feeder {
	return &feeder{src: src, limit: limit, wake: make(chan struct{}, 1), starved: make(chan struct{})}
}

func (f *feeder) request(r Request) {
	f.mu.Lock()
	f.q = append(f.q, r)
	f.mu.Unlock()
	select {
	case f.wake <- struct{}{}:
	default:
	}
}

func (f *feeder) run(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-f.wake:
		}
		f.mu.Lock()
		q := f.q
		f.q = nil
		f.mu.Unlock()
		for _, r := range q {
			if r.Urgent {
				if f.urgent++; f.limit > 0 && f.urgent == f.limit+1 {
					close(f.starved)
				}
			}
			if f.limit > 0 && f.urgent > f.limit {
				continue
			}
			b := f.src.Blocks()[r.Region]
			if _, err := f.svc.PlaceRun(r.Region, r.Page, b.Mem[r.Page*b.PageSize:(r.Page+r.Count)*b.PageSize]); err != nil {
				return err
			}
		}
	}
}

// served is a fault service and its feeder, running.
type served struct {
	svc    *Service
	fd     *uffd.FD
	fe     *feeder
	cancel context.CancelFunc
	errs   chan error
	once   sync.Once
}

// serve starts a fault service for c fed from src.
func serve(t testing.TB, c guest.Postcopier, src guest.Guest, limit int, opts Options) *served {
	t.Helper()
	s := prepareServe(t, c, src, limit, opts)
	s.start(t)
	return s
}

// prepareServe builds the service (FromGuest: it takes over the guest's
// userfaultfd and rebuilds the received bitmap) without running it, so a
// test can look at what it rebuilt before any fault is answered; start
// runs it.
func prepareServe(t testing.TB, c guest.Postcopier, src guest.Guest, limit int, opts Options) *served {
	t.Helper()
	fe := newFeeder(src, limit)
	opts.Request = fe.request
	svc, fd, err := FromGuest(c, opts)
	if err != nil {
		t.Fatal(err)
	}
	fe.svc = svc
	return &served{svc: svc, fd: fd, fe: fe, errs: make(chan error, 2)}
}

// start runs a prepared service and its feeder until stop.
func (s *served) start(t testing.TB) {
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	go func() { s.errs <- s.svc.Run(ctx) }()
	go func() { s.errs <- s.fe.run(ctx) }()
	t.Cleanup(func() { s.stop(t) })
}

// stop ends the service and the feeder and closes migctl's copy of the
// userfaultfd.
func (s *served) stop(t testing.TB) {
	s.once.Do(func() {
		s.cancel()
		for range 2 {
			if err := <-s.errs; !errors.Is(err, context.Canceled) {
				t.Errorf("fault service or feeder: %v", err)
			}
		}
		s.fd.Close()
	})
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func newSource(t testing.TB, cfg guest.Config) *guest.Builtin {
	t.Helper()
	g, err := guest.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

// spawnDest starts a destination guest process and attaches to it; at
// cleanup the process quits (or is killed) and is waited for.
func spawnDest(t testing.TB, cfg proc.Config) (*proc.Process, *proc.Client) {
	t.Helper()
	if err := uffd.Probe(); err != nil {
		t.Skipf("postcopy needs userfaultfd: %v", err)
	}
	cfg.Role = proc.RoleDestination
	p, c, err := proc.Start(ctxT(t, 30*time.Second), proc.SpawnOptions{Config: cfg}, proc.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { quit(t, p, c) })
	return p, c
}

func quit(t testing.TB, p *proc.Process, c *proc.Client) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if c == nil || c.Quit(ctx) != nil {
		p.Kill()
	}
	if err := p.Wait(ctx); errors.Is(err, context.DeadlineExceeded) {
		p.Kill()
		p.Wait(context.Background())
	}
}

func loadDevices(t testing.TB, src, c guest.Guest) {
	t.Helper()
	for i, d := range src.Devices() {
		s, err := d.Save()
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Devices()[i].Load(s); err != nil {
			t.Fatal(err)
		}
	}
}

// ramEqual compares the guest process's RAM with the source's, block by
// block (CRC-32C of every page, computed in the guest process).
func ramEqual(t testing.TB, c *proc.Client, src *guest.Builtin) {
	t.Helper()
	got, err := c.Digest(ctxT(t, 30*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	want, err := src.Digest()
	if err != nil {
		t.Fatal(err)
	}
	for i := range want.Blocks {
		if got.Blocks[i] != want.Blocks[i] {
			t.Fatalf("block %s: guest process %+v, source %+v", want.Blocks[i].Name, got.Blocks[i], want.Blocks[i])
		}
	}
}

func stats(t testing.TB, c *proc.Client) proc.Stats {
	t.Helper()
	st, err := c.Stats(ctxT(t, 20*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// A guest process starts with none of its RAM; its two reader vCPUs fault
// on every page, the service requests each one from the in-memory source
// and installs it with UFFDIO_COPY. Afterwards every page equals the
// source's, no reader ever saw a data page of zeros, each reader's thread
// shows up as a vCPU in the blocktime statistics, and no fault came from
// anything else.
func TestFaultsServedFromSource(t *testing.T) {
	cfg := guest.Config{Size: 16 * mib, Seed: 5, ZeroFraction: 0.1}
	src := newSource(t, cfg)
	_, c := spawnDest(t, proc.Config{Guest: cfg, Readers: 2})
	if c.ID() != src.ID() {
		t.Fatalf("destination ID %q, source %q", c.ID(), src.ID())
	}
	loadDevices(t, src, c)
	sv := serve(t, c, src, 0, Options{})
	ctx := ctxT(t, 120*time.Second)
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitReaders(ctx, 1, 90*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	// The kernel wakes a faulting thread inside UFFDIO_COPY, before the
	// service records the page: stop it so its records are final.
	sv.stop(t)
	st := stats(t, c)
	if st.LostReads != 0 {
		t.Fatalf("readers read %d data pages as zeros (first: %s)", st.LostReads, st.FirstLost)
	}
	if st.Received != st.Pages || !sv.svc.Complete() {
		t.Fatalf("%d of %d pages received after every page was read", st.Received, st.Pages)
	}
	ramEqual(t, c, src)

	ss := sv.svc.Stats()
	var dist uint64
	for _, n := range ss.LatencyDist {
		dist += n
	}
	if ss.Requests == 0 || ss.RemoteFaults < ss.Requests || dist != ss.RemoteFaults || ss.Pending != 0 {
		t.Fatalf("service stats %+v", ss)
	}
	if uffd.Feature(c.Hello().Features).Has(uffd.FeatureThreadID) {
		if len(ss.VCPU) != 2 || ss.NonVCPUFaults != 0 {
			t.Fatalf("vCPU stats %+v, %d non-vCPU faults; want the 2 readers and nothing else", ss.VCPU, ss.NonVCPUFaults)
		}
		for _, v := range ss.VCPU {
			if v.Faults == 0 || v.BlockTime <= 0 {
				t.Fatalf("reader thread %d: %+v", v.TID, v)
			}
		}
	}
	t.Logf("%d faults, %d requests, mean latency %v, first touch p50 %v p99 %v", ss.Faults, ss.Requests, ss.Latency(), st.FirstTouch.P50, st.FirstTouch.P99)
}

// version returns the version a data page of the built-in guest claims
// (bytes 4..7 of its header, see the page format in package guest).
func version(page []byte) uint32 { return binary.LittleEndian.Uint32(page[4:8]) }

// Writers and a reader fault at the same time, while the background stream
// pushes every page too. The source is itself a guest process whose writers
// ran first, so many source pages are at version 2 or more. Afterwards every
// page is a valid version of itself (no torn page), no read found zeros,
// and no page is older than the source's: a page zero-filled and then
// rewritten by a destination writer would restart at version 1.
func TestWritersFaultWhileBackgroundStreams(t *testing.T) {
	cfg := guest.Config{Size: 16 * mib, Seed: 6, ZeroFraction: 0.05, DirtyRate: 256 * mib, Writers: 2}
	ctx := ctxT(t, 180*time.Second)
	sp, src, err := proc.Start(ctx, proc.SpawnOptions{Config: proc.Config{Guest: cfg, Role: proc.RoleSource, Readers: 1}}, proc.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { quit(t, sp, src) })
	if err := src.Start(); err != nil {
		t.Fatal(err)
	}
	for passes := 1; ; passes++ { // until the source writers rewrote a fair share
		if err := src.WaitReaders(ctx, passes, 60*time.Second); err != nil {
			t.Fatal(err)
		}
		if st := stats(t, src); st.Guest.PagesWritten >= uint64(st.Pages)/2 {
			break
		}
	}
	if err := src.Stop(); err != nil {
		t.Fatal(err)
	}

	_, c := spawnDest(t, proc.Config{Guest: cfg, Readers: 1})
	loadDevices(t, src, c)
	sv := serve(t, c, src, 0, Options{})
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	for i, b := range src.Blocks() { // the background stream, beside the faults
		for p := 0; p < b.Pages(); p += 16 {
			q := min(p+16, b.Pages())
			if _, err := sv.svc.PlaceRun(i, p, b.Mem[p*b.PageSize:q*b.PageSize]); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := c.WaitReaders(ctx, 1, 90*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	sv.stop(t)
	if !sv.svc.Complete() {
		t.Fatal("pages missing after the background stream")
	}
	if err := c.Verify(ctx); err != nil {
		t.Fatal(err)
	}
	st := stats(t, c)
	if st.LostReads != 0 {
		t.Fatalf("%d lost reads (first: %s)", st.LostReads, st.FirstLost)
	}
	newer, older := 0, 0
	for i, b := range c.Blocks() { // every page is present: reading migctl's mapping is safe now
		for p := range b.Pages() {
			s, d := src.Blocks()[i].Page(p), b.Page(p)
			vs, vd := version(s), version(d)
			switch {
			case vd < vs:
				t.Errorf("%s page %d: version %d on the destination, %d on the source", b.Name, p, vd, vs)
				if older++; older > 5 {
					t.FailNow()
				}
			case vd == vs && !bytes.Equal(s, d):
				t.Fatalf("%s page %d: same version %d, different bytes", b.Name, p, vs)
			case vs >= 2:
				newer++
			}
		}
	}
	if newer == 0 {
		t.Fatal("no source page was past version 1: the check above proved nothing")
	}
	t.Logf("%d pages written on the source, %d on the destination; %d source pages past version 1", stats(t, src).Guest.PagesWritten, st.Guest.PagesWritten, newer)
}

// received picks the pages the test pretends precopy delivered: a fixed,
// irregular half.
func received(p int) bool { return (p*2654435761)>>9&1 == 0 }

// Pre-faulting and postcopy: migctl pre-faults all of the destination's RAM
// (MADV_POPULATE_WRITE through its own mapping), precopy delivers half of
// the pages, then postcopy starts. Without punching holes, every page not
// received is a present zero page and the readers read it without faulting
// (the hazard, shown); with PunchHoles first, every such page faults, is
// fetched, and no page reads zero where the source had data.
func TestPunchHolesBeforePostcopy(t *testing.T) {
	cfg := guest.Config{Size: 8 * mib, Seed: 8, ZeroFraction: 0.1}
	src := newSource(t, cfg)
	for _, punch := range []bool{false, true} {
		t.Run(fmt.Sprintf("punch=%v", punch), func(t *testing.T) {
			_, c := spawnDest(t, proc.Config{Guest: cfg, Readers: 2})
			ctx := ctxT(t, 120*time.Second)
			loadDevices(t, src, c)
			fe := newFeeder(src, 0)
			svc, fd, err := FromGuest(c, Options{Request: fe.request})
			if err != nil {
				t.Fatal(err)
			}
			defer fd.Close()
			fe.svc = svc
			lostData, missing := 0, 0
			for i, b := range c.Blocks() {
				if err := guest.Populate(ctx, b); err != nil {
					t.Skipf("cannot pre-fault here: %v", err)
				}
				for p := range b.Pages() {
					if received(p) {
						copy(b.Page(p), src.Blocks()[i].Page(p)) // precopy, guest stopped
						svc.MarkReceived(i, p)
						continue
					}
					missing++
					if !src.IsZeroPage(i, p) {
						lostData++
					}
				}
			}
			if punch {
				n, err := svc.PunchHoles()
				if err != nil || n != missing {
					t.Fatalf("PunchHoles: %d pages, %v; want %d", n, err, missing)
				}
			}
			rctx, cancel := context.WithCancel(context.Background())
			errs := make(chan error, 2)
			go func() { errs <- svc.Run(rctx) }()
			go func() { errs <- fe.run(rctx) }()
			var once sync.Once
			stopService := func() {
				once.Do(func() {
					cancel()
					for range 2 {
						if err := <-errs; !errors.Is(err, context.Canceled) {
							t.Error(err)
						}
					}
				})
			}
			defer stopService()
			if err := c.Start(); err != nil {
				t.Fatal(err)
			}
			if err := c.WaitReaders(ctx, 1, 90*time.Second); err != nil {
				t.Fatal(err)
			}
			if err := c.Stop(); err != nil {
				t.Fatal(err)
			}
			stopService()
			st := stats(t, c)
			if !punch {
				if st.LostReads < uint64(lostData) || lostData == 0 {
					t.Fatalf("without punching, %d lost reads for %d pre-faulted data pages never received: the hazard did not show", st.LostReads, lostData)
				}
				return
			}
			if st.LostReads != 0 {
				t.Fatalf("%d reads found zeros where the source had data (first: %s)", st.LostReads, st.FirstLost)
			}
			if ss := svc.Stats(); ss.Requests == 0 {
				t.Fatal("no page was requested: the punched pages did not fault")
			}
			ramEqual(t, c, src)
		})
	}
}

// afterDeath checks a guest process whose migctl died with faults
// outstanding, then takes over as a new migctl: the reader is still
// blocked (it did not read zeros, it did not finish a pass), the shared
// received bitmap holds exactly what the dead migctl installed, and after
// the new service wakes the orphaned faults every page arrives and equals
// the source's.
//
// (In a Go guest process the runtime's preemption signals also make a
// blocked vCPU retry its fault, which raises it again, so this test would
// pass without WakeAll; TestWakeAllResumesOrphanedFault shows a fault that
// nothing but WakeAll resumes.)
func afterDeath(t *testing.T, p *proc.Process, src *guest.Builtin, installed int) {
	ctx := ctxT(t, 120*time.Second)
	c, err := proc.Attach(ctx, p.Socket, proc.AttachOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { quit(t, p, c) })
	st := stats(t, c)
	if st.LostReads != 0 || !st.Running || st.Received != installed || st.ReaderPasses[0] != 0 {
		t.Fatalf("after migctl died: %+v; want running, %d pages received, no pass done, no lost read", st, installed)
	}
	if err := c.WaitReaders(ctx, 1, 300*time.Millisecond); !errors.Is(err, proc.ErrTimeout) {
		t.Fatalf("the reader went on without a handler (%v): it must stay blocked", err)
	}
	if _, err := c.Digest(ctx); !errors.Is(err, proc.ErrMissingPages) {
		t.Fatalf("Digest with pages missing: %v; want ErrMissingPages (it would read holes)", err)
	}
	rebuildFromMemfd(t, c, installed)
	// Counted before the new service answers any fault: a blocked reader
	// raises its fault again (Go's preemption signals), and an answer
	// would add to the count.
	sv := prepareServe(t, c, src, 0, Options{})
	if n := receivedCount(sv.svc, len(c.Blocks())); n != installed {
		t.Fatalf("rebuilt %d received pages from the shared bitmap, the dead migctl installed %d", n, installed)
	}
	sv.start(t)
	if err := sv.svc.WakeAll(); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitReaders(ctx, 1, 90*time.Second); err != nil {
		t.Fatalf("after the take-over: %v", err)
	}
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	sv.stop(t)
	if st := stats(t, c); st.LostReads != 0 || st.Received != st.Pages {
		t.Fatalf("after the take-over: %+v", st)
	}
	ramEqual(t, c, src)
}

// rebuildFromMemfd checks Rebuild on a guest whose handler died: a page
// installed but whose bit the dead handler never set is marked again, a
// bit set for a hole is cleared, and nothing else changes — found with
// SEEK_DATA/SEEK_HOLE, never by reading (the guest stays blocked on its
// holes).
func rebuildFromMemfd(t *testing.T, c *proc.Client, installed int) {
	t.Helper()
	svc, fd, err := FromGuest(c, Options{Request: func(Request) {}})
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	if m, cl, err := svc.Rebuild(); err != nil || m != 0 || cl != 0 {
		t.Fatalf("Rebuild of a consistent bitmap: %d marked, %d cleared, %v; want 0, 0", m, cl, err)
	}
	present, hole := -1, -1
	for p := range c.Blocks()[0].Pages() {
		if svc.Received(0, p) && present < 0 {
			present = p
		}
		if !svc.Received(0, p) && hole < 0 {
			hole = p
		}
	}
	if present < 0 || hole < 0 {
		t.Fatalf("block 0 has no received page (%d) or no missing one (%d)", present, hole)
	}
	// The dead handler's window: the page is installed, its bit not yet
	// set. And a bit that lies: set for a hole.
	bm := svc.regions[0].Received
	atomic.AndUint64(&bm[present>>6], ^(uint64(1) << (uint(present) & 63)))
	bm.SetAtomic(hole)
	m, cl, err := svc.Rebuild()
	if err != nil || m != 1 || cl != 1 || !svc.Received(0, present) || svc.Received(0, hole) {
		t.Fatalf("Rebuild: %d marked, %d cleared, %v, page %d received %v, hole %d received %v; want 1 marked (the installed page), 1 cleared (the hole)",
			m, cl, err, present, svc.Received(0, present), hole, svc.Received(0, hole))
	}
	if n := receivedCount(svc, len(c.Blocks())); n != installed {
		t.Fatalf("after Rebuild %d pages received, want %d", n, installed)
	}
}

func receivedCount(s *Service, blocks int) int {
	n := 0
	for i := range blocks {
		n += s.ReceivedCount(i)
	}
	return n
}

// migctl's side goes away in this process (its service stops, its copy of
// the userfaultfd, its socket and its mappings close) while a reader waits
// on a page; a new attacher takes over through the socket and finishes.
func TestReattachAfterClientCloses(t *testing.T) {
	cfg := guest.Config{Size: 8 * mib, Seed: 9, ZeroFraction: 0.1}
	src := newSource(t, cfg)
	p, c := spawnDest(t, proc.Config{Guest: cfg, Readers: 1})
	loadDevices(t, src, c)
	sv := serve(t, c, src, 40, Options{Batch: 4})
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sv.fe.starved:
	case <-time.After(60 * time.Second):
		t.Fatal("the reader never got past 40 requests")
	}
	sv.stop(t)
	installed := receivedCount(sv.svc, len(c.Blocks()))
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	afterDeath(t, p, src, installed)
}

// attacherEnv makes the test binary play a migctl (attacherMain) that
// serves some faults and is then killed.
const attacherEnv = "MIGCTL_POSTCOPY_TEST_ATTACHER"

type attacherSpec struct {
	Socket string       `json:"socket"`
	Guest  guest.Config `json:"guest"`
	Limit  int          `json:"limit"`
}

// attacherMain attaches to a guest process, loads its devices from a
// source it builds itself, starts it, serves Limit urgent requests, prints
// "READY <pages installed>" and waits to be killed.
func attacherMain(specJSON string) int {
	var spec attacherSpec
	if err := json.Unmarshal([]byte(specJSON), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "attacher:", err)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	fail := func(err error) int { fmt.Fprintln(os.Stderr, "attacher:", err); return 2 }
	c, err := proc.Attach(ctx, spec.Socket, proc.AttachOptions{})
	if err != nil {
		return fail(err)
	}
	src, err := guest.New(spec.Guest)
	if err != nil {
		return fail(err)
	}
	for i, d := range src.Devices() {
		s, _ := d.Save()
		if err := c.Devices()[i].Load(s); err != nil {
			return fail(err)
		}
	}
	fe := newFeeder(src, spec.Limit)
	svc, _, err := FromGuest(c, Options{Request: fe.request, Batch: 4})
	if err != nil {
		return fail(err)
	}
	fe.svc = svc
	go svc.Run(ctx)
	go fe.run(ctx)
	if err := c.Start(); err != nil {
		return fail(err)
	}
	select {
	case <-fe.starved:
	case <-ctx.Done():
		return fail(ctx.Err())
	}
	fmt.Printf("READY %d\n", receivedCount(svc, len(c.Blocks())))
	<-ctx.Done() // killed long before
	return 2
}

// The acceptance row no peer has: the process serving a guest's faults is
// killed with SIGKILL during postcopy. The guest process stays blocked on
// its missing pages (never reads zeros), and a new migctl — this test —
// attaches to its socket, rebuilds what was received from the shared
// bitmap, and finishes with every page equal to the source's.
func TestReattachAfterKill9(t *testing.T) {
	cfg := guest.Config{Size: 8 * mib, Seed: 10, ZeroFraction: 0.1}
	src := newSource(t, cfg)
	if err := uffd.Probe(); err != nil {
		t.Skipf("postcopy needs userfaultfd: %v", err)
	}
	p, err := proc.Spawn(proc.SpawnOptions{Config: proc.Config{Guest: cfg, Role: proc.RoleDestination, Readers: 1}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { quit(t, p, nil) })
	spec, _ := json.Marshal(attacherSpec{Socket: p.Socket, Guest: cfg, Limit: 40})
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), attacherEnv+"="+string(spec))
	cmd.Stdout, cmd.Stderr = w, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	killed := false
	defer func() {
		if !killed {
			cmd.Process.Kill()
			cmd.Wait()
		}
	}()
	r.SetReadDeadline(time.Now().Add(60 * time.Second))
	line, err := bufio.NewReader(r).ReadString('\n')
	var installed int
	if _, serr := fmt.Sscanf(strings.TrimSpace(line), "READY %d", &installed); err != nil || serr != nil {
		t.Fatalf("attacher said %q (%v, %v)", line, err, serr)
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	killed = true
	if err := cmd.Wait(); err == nil {
		t.Fatal("the attacher exited cleanly instead of being killed")
	}
	afterDeath(t, p, src, installed)
}

// STOP while a vCPU is blocked on a page nobody serves fails with
// ErrTimeout after the guest process's OpTimeout instead of hanging; the
// stop completes in the background once the page arrives, and until then
// the lifecycle stays busy (START fails the same way).
func TestStopWhileBlocked(t *testing.T) {
	cfg := guest.Config{Size: 2 * mib, Seed: 13}
	src := newSource(t, cfg)
	_, c := spawnDest(t, proc.Config{Guest: cfg, Readers: 1, OpTimeout: 2 * time.Second})
	ctx := ctxT(t, 60*time.Second)
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	u, err := c.Userfault()
	if err != nil {
		t.Fatal(err)
	}
	pfd := []unix.PollFd{{Fd: int32(u.FD), Events: unix.POLLIN}}
	if n, err := unix.Poll(pfd, 20_000); n != 1 || err != nil { // the reader's fault is queued: it is blocked
		t.Fatalf("no fault within 20 s: %d, %v", n, err)
	}
	if err := c.StopContext(ctx); !errors.Is(err, proc.ErrTimeout) {
		t.Fatalf("Stop with the reader blocked: %v, want ErrTimeout", err)
	}
	if err := c.StartContext(ctx); !errors.Is(err, proc.ErrTimeout) {
		t.Fatalf("Start while the stop waits: %v, want ErrTimeout", err)
	}
	serve(t, c, src, 0, Options{})
	if err := c.StopContext(ctx); err != nil {
		t.Fatalf("Stop once the page arrived: %v", err)
	}
	if st := stats(t, c); st.Running || st.LostReads != 0 {
		t.Fatalf("after the stop: %+v", st)
	}
}
