package postcopy

import (
	"bytes"
	"context"
	"errors"
	"runtime"
	"slices"
	"testing"
	"time"
	"unsafe"

	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/uffd"
	"golang.org/x/sys/unix"
)

const pg = 4096

// memRegion is a memfd mapped in this process and registered with an
// in-process userfaultfd. Go code never touches its mapping: faults come
// from inside system calls (faultFrom), content is read through the memfd.
type memRegion struct {
	fd  int
	mem []byte
	uf  *uffd.FD
	r   Region
}

func newMemRegion(t *testing.T, pages int) *memRegion {
	t.Helper()
	if err := uffd.Probe(); err != nil {
		t.Skipf("userfaultfd unavailable: %v", err)
	}
	fd, err := unix.MemfdCreate("postcopy-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, int64(pages*pg)); err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(fd, 0, pages*pg, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	uf, err := uffd.Open(uffd.Options{Features: uffd.FeatureMissingShmem | uffd.FeatureThreadID, UserMode: uffd.UserModeAll})
	if err != nil {
		t.Fatal(err)
	}
	m := &memRegion{fd: fd, mem: mem, uf: uf}
	t.Cleanup(func() { uf.Close(); unix.Munmap(mem); unix.Close(fd) })
	addr := uint64(uintptr(unsafe.Pointer(&mem[0])))
	if _, err := uf.Register(uffd.Range{Start: addr, Len: uint64(pages * pg)}, uffd.ModeMissing); err != nil {
		t.Fatal(err)
	}
	m.r = Region{Name: "test", Addr: addr, Len: uint64(pages * pg), PageSize: pg, MemFD: fd, Received: guest.NewBitmap(pages)}
	return m
}

func (m *memRegion) file(t *testing.T, p int) []byte {
	t.Helper()
	b := make([]byte, pg)
	if _, err := unix.Pread(m.fd, b, int64(p*pg)); err != nil {
		t.Fatal(err)
	}
	return b
}

func (m *memRegion) hole(t *testing.T, p int) bool {
	t.Helper()
	off, err := unix.Seek(m.fd, int64(p*pg), unix.SEEK_DATA)
	return err == unix.ENXIO || (err == nil && off != int64(p*pg))
}

type faulted struct {
	tid  int
	data []byte
	err  error
}

// faultFrom reads page p of m from inside pwrite(2) on a locked thread; the
// thread id is known before the fault happens.
func faultFrom(t *testing.T, m *memRegion, p int) (tid int, done <-chan faulted) {
	t.Helper()
	scratch, err := unix.MemfdCreate("scratch", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	tids := make(chan int, 1)
	out := make(chan faulted, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer unix.Close(scratch)
		tid := unix.Gettid()
		tids <- tid
		_, err := unix.Pwrite(scratch, m.mem[p*pg:(p+1)*pg], 0)
		data := make([]byte, pg)
		unix.Pread(scratch, data, 0)
		out <- faulted{tid, data, err}
	}()
	return <-tids, out
}

func pattern(seed byte) []byte {
	b := make([]byte, pg)
	for i := range b {
		b[i] = seed ^ byte(i*13)
	}
	return b
}

func recv[T any](t *testing.T, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(20 * time.Second):
		t.Fatal("nothing within 20 s")
	}
	var zero T
	return zero
}

// The fault loop in one process (faults from inside system calls): a
// missing page becomes an urgent request for it, then one request for the
// aligned batch around it; Place installs it and the faulting call reads
// its bytes; a page known to be zero is resolved without a request; the
// blocktime of a single vCPU is all-vCPU blocktime.
func TestServiceRequestsAndInstalls(t *testing.T) {
	m := newMemRegion(t, 32)
	reqs := make(chan Request, 64)
	tid, done := faultFrom(t, m, 3)
	s, err := New(m.uf, []Region{m.r}, Options{Request: func(r Request) { reqs <- r }, Batch: 8, VCPUThreads: []int{tid}})
	if err != nil {
		t.Fatal(err)
	}
	s.MarkZero(0, 20)
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- s.Run(ctx) }()
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cancel()
			if err := <-ran; !errors.Is(err, context.Canceled) {
				t.Errorf("Run: %v", err)
			}
		}
	}
	defer stop()

	got := []Request{recv(t, reqs), recv(t, reqs)}
	want := []Request{{Region: 0, Page: 3, Count: 1, Urgent: true}, {Region: 0, Page: 0, Count: 8}}
	if !slices.Equal(got, want) {
		t.Fatalf("requests %+v, want %+v", got, want)
	}
	if err := s.Place(0, 3, pattern(3)); err != nil {
		t.Fatal(err)
	}
	f := recv(t, done)
	if f.err != nil || !bytes.Equal(f.data, pattern(3)) {
		t.Fatalf("faulting read: %v, right bytes: %v", f.err, bytes.Equal(f.data, pattern(3)))
	}
	// the batch arrives: page 3 is skipped, the rest installed in one run
	batch := slices.Concat(pattern(10), pattern(11), pattern(12), pattern(99), pattern(14), pattern(15), pattern(16), pattern(17))
	n, err := s.PlaceRun(0, 0, batch)
	if err != nil || n != 7 {
		t.Fatalf("PlaceRun: %d, %v; want 7 pages", n, err)
	}
	if !bytes.Equal(m.file(t, 3), pattern(3)) || !bytes.Equal(m.file(t, 4), pattern(14)) {
		t.Fatal("the batch overwrote the faulting page or missed a neighbour")
	}

	_, done = faultFrom(t, m, 20)
	f = recv(t, done)
	if f.err != nil || !bytes.Equal(f.data, make([]byte, pg)) {
		t.Fatalf("zero page fault: %v", f.err)
	}
	select {
	case r := <-reqs:
		t.Fatalf("a known zero page was requested: %+v", r)
	default:
	}

	stop() // the fault thread has finished with every message it read
	st := s.Stats()
	if st.Requests != 1 || st.Prefetches != 1 || st.ZeroFaults != 1 || st.RemoteFaults != 1 || st.Installed != 9 || st.Pending != 0 {
		t.Fatalf("stats %+v", st)
	}
	if st.VCPU[0].Faults != 1 || st.BlockTime <= 0 || st.BlockTime != st.VCPU[0].BlockTime {
		t.Fatalf("one vCPU: blocktime %v, its own %v (%d faults); want equal and positive", st.BlockTime, st.VCPU[0].BlockTime, st.VCPU[0].Faults)
	}
	if s.ReceivedCount(0) != 9 {
		t.Fatalf("received %d pages, want 9", s.ReceivedCount(0))
	}
}

// WakeAll re-raises a fault that was read but never resolved (a handler
// that died): the blocked thread retries; if its page is present now, it
// proceeds.
func TestWakeAllResumesOrphanedFault(t *testing.T) {
	m := newMemRegion(t, 4)
	reqs := make(chan Request, 8)
	s, err := New(m.uf, []Region{m.r}, Options{Request: func(r Request) { reqs <- r }, Batch: 1})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- s.Run(ctx) }()
	_, done := faultFrom(t, m, 1)
	if r := recv(t, reqs); r.Page != 1 {
		t.Fatalf("request %+v", r)
	}
	// Another handler installs the page without waking anyone, then dies.
	if _, err := m.uf.Copy(m.r.Addr+pg, pattern(1), uffd.CopyDontWake); err != nil {
		t.Fatal(err)
	}
	s.MarkReceived(0, 1)
	select {
	case <-done:
		t.Fatal("the thread proceeded without a wake")
	default:
	}
	if err := s.WakeAll(); err != nil {
		t.Fatal(err)
	}
	if f := recv(t, done); f.err != nil || !bytes.Equal(f.data, pattern(1)) {
		t.Fatalf("after WakeAll: %v", f.err)
	}
	cancel()
	if err := <-ran; !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
}

// The fault handler's decisions, fed messages directly: a page already
// present is woken (not requested), a fault outside every region and an
// event the service does not handle stop it with an error.
func TestFaultDecisions(t *testing.T) {
	m := newMemRegion(t, 4)
	reqs := make(chan Request, 8)
	s, err := New(m.uf, []Region{m.r}, Options{Request: func(r Request) { reqs <- r }})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Place(0, 2, pattern(2)); err != nil {
		t.Fatal(err)
	}
	if err := s.fault(uffd.Msg{Event: uffd.EventPagefault, Address: m.r.Addr + 2*pg + 100}, time.Now()); err != nil {
		t.Fatal(err)
	}
	if st := s.Stats(); st.Wakes != 1 || st.Requests != 0 || len(reqs) != 0 {
		t.Fatalf("fault on a present page: %+v, %d requests", st, len(reqs))
	}
	if err := s.fault(uffd.Msg{Event: uffd.EventPagefault, Address: m.r.Addr + 4*pg}, time.Now()); !errors.Is(err, ErrStrayFault) {
		t.Fatalf("fault past the region: %v", err)
	}
	if err := s.fault(uffd.Msg{Event: uffd.EventRemap}, time.Now()); err == nil {
		t.Fatal("a remap event was accepted")
	}
	if _, err := s.PlaceRun(0, 3, slices.Concat(pattern(1), pattern(2))); err == nil {
		t.Fatal("PlaceRun past the region's end was accepted")
	}
}

// PunchHoles turns every page not received into a hole, whatever it held,
// and leaves received pages alone.
func TestPunchHoles(t *testing.T) {
	m := newMemRegion(t, 8)
	s, err := New(m.uf, []Region{m.r}, Options{Request: func(Request) {}})
	if err != nil {
		t.Fatal(err)
	}
	for p := range 8 { // everything pre-faulted / written through another mapping
		if _, err := unix.Pwrite(m.fd, pattern(byte(p)), int64(p*pg)); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []int{0, 3, 4} {
		s.MarkReceived(0, p)
	}
	n, err := s.PunchHoles()
	if err != nil || n != 5 {
		t.Fatalf("PunchHoles: %d, %v; want 5 pages", n, err)
	}
	for p := range 8 {
		received := p == 0 || p == 3 || p == 4
		if m.hole(t, p) == received {
			t.Errorf("page %d: hole %v, received %v", p, m.hole(t, p), received)
		}
		if received && !bytes.Equal(m.file(t, p), pattern(byte(p))) {
			t.Errorf("received page %d lost its bytes", p)
		}
	}
}

func TestNewRejectsBadLayout(t *testing.T) {
	m := newMemRegion(t, 4)
	req := Options{Request: func(Request) {}}
	for name, mut := range map[string]func(r *Region){
		"page size":    func(r *Region) { r.PageSize = 3000 },
		"unaligned":    func(r *Region) { r.Addr++ },
		"short bitmap": func(r *Region) { r.Received = nil },
		"empty":        func(r *Region) { r.Len = 0 },
	} {
		r := m.r
		mut(&r)
		if _, err := New(m.uf, []Region{r}, req); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := New(m.uf, []Region{m.r, m.r}, req); err == nil {
		t.Error("overlapping regions accepted")
	}
	if _, err := New(m.uf, []Region{m.r}, Options{}); err == nil {
		t.Error("no Request accepted")
	}
}

// A fault whose page became present before the service read its message
// (installed by another path without a wake) is answered with UFFDIO_WAKE:
// without it, the thread would stay blocked on a present page forever.
func TestFaultOnPresentPageIsWoken(t *testing.T) {
	m := newMemRegion(t, 2)
	reqs := make(chan Request, 8)
	s, err := New(m.uf, []Region{m.r}, Options{Request: func(r Request) { reqs <- r }})
	if err != nil {
		t.Fatal(err)
	}
	_, done := faultFrom(t, m, 0)
	pfd := []unix.PollFd{{Fd: int32(m.uf.Fd()), Events: unix.POLLIN}}
	if n, err := unix.Poll(pfd, 20_000); n != 1 || err != nil { // the fault message is queued
		t.Fatalf("no fault message within 20 s: %d, %v", n, err)
	}
	if _, err := m.uf.Copy(m.r.Addr, pattern(7), uffd.CopyDontWake); err != nil {
		t.Fatal(err)
	}
	s.MarkReceived(0, 0)
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- s.Run(ctx) }()
	f := recv(t, done)
	cancel()
	if err := <-ran; !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	if f.err != nil || !bytes.Equal(f.data, pattern(7)) {
		t.Fatalf("faulting read: %v", f.err)
	}
	if st := s.Stats(); st.Wakes != 1 || st.Requests != 0 || len(reqs) != 0 {
		t.Fatalf("stats %+v, %d requests: want one wake and no request", st, len(reqs))
	}
}
