package uffd

import (
	"bytes"
	"context"
	"errors"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

const pg = 4096

// region is a memfd of some pages mapped MAP_SHARED in this process. Tests
// never read or write mem from Go code while any page may be missing: they
// fault from inside system calls (faultFrom) and look at content through the
// memfd (readFile, present), which never faults and never fills a hole.
type region struct {
	fd   int
	mem  []byte
	base uint64
}

func newRegion(t testing.TB, pages int) *region {
	t.Helper()
	fd, err := unix.MemfdCreate("uffd-test", unix.MFD_CLOEXEC)
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
	t.Cleanup(func() { unix.Munmap(mem); unix.Close(fd) })
	return &region{fd: fd, mem: mem, base: uint64(uintptr(unsafe.Pointer(&mem[0])))}
}

func (r *region) addr(p int) uint64 { return r.base + uint64(p*pg) }

func (r *region) rng(p, n int) Range { return Range{r.addr(p), uint64(n * pg)} }

// readFile returns page p as the memfd holds it (pread: a hole reads as zeros
// and stays a hole).
func (r *region) readFile(t testing.TB, p int) []byte {
	t.Helper()
	b := make([]byte, pg)
	if n, err := unix.Pread(r.fd, b, int64(p*pg)); err != nil || n != pg {
		t.Fatalf("pread page %d: %d, %v", p, n, err)
	}
	return b
}

// present reports whether page p has backing in the memfd (SEEK_DATA).
func (r *region) present(t testing.TB, p int) bool {
	t.Helper()
	off, err := unix.Seek(r.fd, int64(p*pg), unix.SEEK_DATA)
	if err == unix.ENXIO {
		return false
	}
	if err != nil {
		t.Fatalf("SEEK_DATA: %v", err)
	}
	return off == int64(p*pg)
}

func pattern(seed byte) []byte {
	b := make([]byte, pg)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

// openFD opens a userfaultfd or skips the test, saying why.
func openFD(t testing.TB, opts Options) *FD {
	t.Helper()
	if err := Probe(); err != nil {
		t.Skipf("this machine cannot run userfaultfd tests: %v", err)
	}
	f, err := Open(opts)
	if err != nil {
		t.Fatalf("Open(%+v): %v", opts, err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

type faultResult struct {
	tid  int
	n    int
	err  error
	data []byte // what the kernel read from the page
}

// faultFrom makes the kernel read page p of r from inside a system call
// (pwrite of the page into a scratch memfd) on a locked OS thread. The
// goroutine sits in the system call, where the Go runtime never waits for
// it, until the fault is resolved; then it sends the result.
func faultFrom(t testing.TB, r *region, p int) <-chan faultResult {
	t.Helper()
	scratch, err := unix.MemfdCreate("uffd-scratch", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	tids := make(chan int, 1)
	res := make(chan faultResult, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer unix.Close(scratch)
		tid := unix.Gettid()
		tids <- tid
		n, err := unix.Pwrite(scratch, r.mem[p*pg:(p+1)*pg], 0)
		data := make([]byte, pg)
		if err == nil {
			unix.Pread(scratch, data, 0)
		}
		res <- faultResult{tid: tid, n: n, err: err, data: data}
	}()
	<-tids
	return res
}

func readOne(t testing.TB, f *FD) Msg {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	msgs := make([]Msg, 4)
	n, err := f.Read(ctx, msgs)
	if err != nil {
		t.Fatalf("Read: %v", err)
	}
	if n != 1 {
		t.Fatalf("Read returned %d messages, want 1: %+v", n, msgs[:n])
	}
	return msgs[0]
}

func wait(t testing.TB, ch <-chan faultResult) faultResult {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(20 * time.Second):
		t.Fatal("the faulting system call did not return within 20 s")
	}
	return faultResult{}
}

// The ioctl numbers, recomputed with the _IOC formula from the sizes of the
// structs, must equal the values of linux/userfaultfd.h (written here).
func TestIoctlNumbers(t *testing.T) {
	ioc := func(dir, nr, size uintptr) uintptr { return dir<<30 | size<<16 | 0xAA<<8 | nr }
	const r, wr = 2, 3
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		{"UFFDIO_API", ioc(wr, 0x3F, unsafe.Sizeof(apiArg{})), 0xc018aa3f},
		{"UFFDIO_REGISTER", ioc(wr, 0x00, unsafe.Sizeof(registerArg{})), 0xc020aa00},
		{"UFFDIO_UNREGISTER", ioc(r, 0x01, unsafe.Sizeof(rangeArg{})), 0x8010aa01},
		{"UFFDIO_WAKE", ioc(r, 0x02, unsafe.Sizeof(rangeArg{})), 0x8010aa02},
		{"UFFDIO_COPY", ioc(wr, 0x03, unsafe.Sizeof(copyArg{})), 0xc028aa03},
		{"UFFDIO_ZEROPAGE", ioc(wr, 0x04, unsafe.Sizeof(zeropageArg{})), 0xc020aa04},
	} {
		if c.got != c.want {
			t.Errorf("%s: computed %#x, header says %#x", c.name, c.got, c.want)
		}
	}
	consts := map[string][2]uintptr{
		"API": {ioctlAPI, 0xc018aa3f}, "REGISTER": {ioctlRegister, 0xc020aa00}, "UNREGISTER": {ioctlUnregister, 0x8010aa01},
		"WAKE": {ioctlWake, 0x8010aa02}, "COPY": {ioctlCopy, 0xc028aa03}, "ZEROPAGE": {ioctlZeropage, 0xc020aa04},
	}
	for name, v := range consts {
		if v[0] != v[1] {
			t.Errorf("constant %s = %#x, want %#x", name, v[0], v[1])
		}
	}
}

func TestProbe(t *testing.T) {
	err := Probe()
	if err != nil {
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("Probe error does not wrap ErrUnavailable: %v", err)
		}
		t.Skipf("userfaultfd unavailable here (the probe's reason): %v", err)
	}
	sup, err := Supported()
	if err != nil {
		t.Fatal(err)
	}
	if !sup.Has(FeatureMissingShmem) {
		t.Fatalf("Probe passed but the kernel does not offer missing-shmem: %v", sup)
	}
	t.Logf("kernel features: %#x (%v)", uint64(sup), sup)
}

func TestFeatureString(t *testing.T) {
	for _, c := range []struct {
		f    Feature
		want string
	}{
		{0, "none"},
		{FeatureMissingShmem | FeatureThreadID, "missing-shmem|thread-id"},
		{FeatureMove | 1<<40, "move|bit 40"},
	} {
		if got := c.f.String(); got != c.want {
			t.Errorf("%#x: %q, want %q", uint64(c.f), got, c.want)
		}
	}
}

// A missing page read by the kernel inside a system call: one message with
// the page's address, no flag (a read) and the faulting thread's id; the
// call completes once UFFDIO_COPY installs the page, and reads its bytes.
func TestFaultInstallCopy(t *testing.T) {
	f := openFD(t, Options{Features: FeatureMissingShmem | FeatureThreadID, UserMode: UserModeAll})
	r := newRegion(t, 4)
	ioctls, err := f.Register(r.rng(0, 4), ModeMissing)
	if err != nil {
		t.Fatal(err)
	}
	if !ioctls.Has(IoctlWake | IoctlCopy | IoctlZeropage) {
		t.Fatalf("register on shmem allows ioctls %#x; want wake, copy and zeropage", uint64(ioctls))
	}
	done := faultFrom(t, r, 1)
	var tid int
	m := readOne(t, f)
	want := Msg{Event: EventPagefault, Address: r.addr(1)}
	select {
	case res := <-done:
		t.Fatalf("the system call returned (%d, %v) before the fault was resolved", res.n, res.err)
	default:
	}
	tid = int(m.TID)
	m.Arg, m.TID = [3]uint64{}, 0
	if m != want {
		t.Fatalf("message %+v, want %+v", m, want)
	}
	src := pattern(3)
	res, err := f.CopyPages(r.addr(1), src, pg, 0)
	if err != nil || res.Installed != 1 || len(res.Existing) != 0 {
		t.Fatalf("CopyPages: %+v, %v", res, err)
	}
	got := wait(t, done)
	if got.err != nil || got.n != pg || !bytes.Equal(got.data, src) {
		t.Fatalf("faulting pwrite returned %d, %v; data equal: %v", got.n, got.err, bytes.Equal(got.data, src))
	}
	if tid != got.tid {
		t.Fatalf("message thread id %d, faulting thread %d", tid, got.tid)
	}
	if !bytes.Equal(r.readFile(t, 1), src) || r.present(t, 0) || r.present(t, 2) {
		t.Fatal("page 1 is not the copied bytes, or a neighbour was filled")
	}
}

// CopyPages over a run with a page already present: the others are
// installed in as few calls as the kernel allows, the present one is
// reported and left alone; a second copy of an installed page is EEXIST.
func TestCopyPagesExisting(t *testing.T) {
	f := openFD(t, Options{Features: FeatureMissingShmem, UserMode: UserModeAll})
	r := newRegion(t, 4)
	if _, err := f.Register(r.rng(0, 4), ModeMissing); err != nil {
		t.Fatal(err)
	}
	first := pattern(9)
	if n, err := f.Copy(r.addr(2), first, 0); err != nil || n != pg {
		t.Fatalf("Copy page 2: %d, %v", n, err)
	}
	src := slices.Concat(pattern(1), pattern(2), pattern(3), pattern(4))
	res, err := f.CopyPages(r.addr(0), src, pg, CopyDontWake)
	if err != nil {
		t.Fatal(err)
	}
	if res.Installed != 3 || !slices.Equal(res.Existing, []int{2}) {
		t.Fatalf("CopyPages result %+v, want 3 installed and page 2 existing", res)
	}
	for p, want := range [][]byte{pattern(1), pattern(2), first, pattern(4)} {
		if !bytes.Equal(r.readFile(t, p), want) {
			t.Fatalf("page %d holds the wrong bytes", p)
		}
	}
	if n, err := f.Copy(r.addr(0), pattern(5), 0); !errors.Is(err, unix.EEXIST) || n != 0 {
		t.Fatalf("second Copy of page 0: %d, %v; want 0, EEXIST", n, err)
	}
	if _, err := f.CopyPages(r.addr(0)+1, pattern(5), pg, 0); !errors.Is(err, unix.EINVAL) {
		t.Fatalf("unaligned CopyPages: %v, want EINVAL", err)
	}
}

// UFFDIO_ZEROPAGE on shmem allocates a zero page and wakes the faulter.
func TestZeroPage(t *testing.T) {
	f := openFD(t, Options{Features: FeatureMissingShmem, UserMode: UserModeAll})
	r := newRegion(t, 2)
	if _, err := f.Register(r.rng(0, 2), ModeMissing); err != nil {
		t.Fatal(err)
	}
	done := faultFrom(t, r, 0)
	if m := readOne(t, f); m.Address != r.addr(0) {
		t.Fatalf("fault at %#x, want %#x", m.Address, r.addr(0))
	}
	res, err := f.ZeroPages(r.rng(0, 2), pg, 0)
	if err != nil || res.Installed != 2 {
		t.Fatalf("ZeroPages: %+v, %v", res, err)
	}
	got := wait(t, done)
	if got.err != nil || !bytes.Equal(got.data, make([]byte, pg)) {
		t.Fatalf("faulter: %v, zero: %v", got.err, bytes.Equal(got.data, make([]byte, pg)))
	}
	if !r.present(t, 0) || !r.present(t, 1) {
		t.Fatal("zero pages are not backed after UFFDIO_ZEROPAGE")
	}
	if res, err := f.ZeroPages(r.rng(1, 1), pg, 0); err != nil || !slices.Equal(res.Existing, []int{0}) {
		t.Fatalf("ZeroPages over a present page: %+v, %v; want it reported existing", res, err)
	}
}

// UFFDIO_WAKE without installing: the woken thread retries and faults
// again, so a new message arrives. A new handler that takes over a
// userfaultfd relies on this to see faults its predecessor read but never
// resolved.
func TestWakeRaisesFaultAgain(t *testing.T) {
	f := openFD(t, Options{Features: FeatureMissingShmem, UserMode: UserModeAll})
	r := newRegion(t, 2)
	if _, err := f.Register(r.rng(0, 2), ModeMissing); err != nil {
		t.Fatal(err)
	}
	done := faultFrom(t, r, 1)
	m1 := readOne(t, f)
	if err := f.Wake(r.rng(0, 2)); err != nil {
		t.Fatal(err)
	}
	m2 := readOne(t, f)
	if m1.Address != r.addr(1) || m2.Address != r.addr(1) {
		t.Fatalf("faults at %#x then %#x, want both at %#x", m1.Address, m2.Address, r.addr(1))
	}
	if _, err := f.CopyPages(r.addr(1), pattern(4), pg, 0); err != nil {
		t.Fatal(err)
	}
	if got := wait(t, done); got.err != nil || !bytes.Equal(got.data, pattern(4)) {
		t.Fatalf("faulter: %v", got.err)
	}
}

// With UFFD_USER_MODE_ONLY a fault taken by the kernel is not reported: the
// system call fails with EFAULT (reference go-libs.md §4).
func TestUserModeOnlyKernelFault(t *testing.T) {
	f := openFD(t, Options{Features: FeatureMissingShmem, UserMode: UserModeOnly})
	if !f.UserModeOnly() {
		t.Fatal("UserModeOnly not recorded")
	}
	r := newRegion(t, 1)
	if _, err := f.Register(r.rng(0, 1), ModeMissing); err != nil {
		t.Fatal(err)
	}
	got := wait(t, faultFrom(t, r, 0))
	if !errors.Is(got.err, unix.EFAULT) {
		t.Fatalf("kernel-mode fault in user-mode-only registration: %d, %v; want EFAULT", got.n, got.err)
	}
}

// If every copy of the descriptor is closed, the registration goes and a
// missing page reads as zeros without any message (reference row 13): the
// reason the guest process keeps its own copy.
func TestClosedDescriptorZeroFills(t *testing.T) {
	f := openFD(t, Options{Features: FeatureMissingShmem, UserMode: UserModeAll})
	r := newRegion(t, 1)
	if _, err := f.Register(r.rng(0, 1), ModeMissing); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	got := wait(t, faultFrom(t, r, 0))
	if got.err != nil || !bytes.Equal(got.data, make([]byte, pg)) {
		t.Fatalf("read after the last close: %v; want zeros and no error", got.err)
	}
	if _, err := f.Register(r.rng(0, 1), ModeMissing); !errors.Is(err, ErrClosed) {
		t.Fatalf("Register after Close: %v, want ErrClosed", err)
	}
}

// watchedCtx tells when Read has arranged for its cancellation
// (context.AfterFunc calls the AfterFunc method of a context that has
// one): from then on Read is in, or about to enter, its poll.
type watchedCtx struct {
	context.Context
	once       sync.Once
	registered chan struct{}
}

// Value hides the embedded context's values, among them the one by which
// the context package would recognise its own cancelCtx and bypass
// AfterFunc below.
func (c *watchedCtx) Value(any) any { return nil }

func (c *watchedCtx) AfterFunc(f func()) func() bool {
	stop := context.AfterFunc(c.Context, f)
	c.once.Do(func() { close(c.registered) })
	return stop
}

func watched(ctx context.Context) *watchedCtx {
	return &watchedCtx{Context: ctx, registered: make(chan struct{})}
}

func recvErr(t *testing.T, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(20 * time.Second):
		t.Fatal("the blocked Read did not return within 20 s")
	}
	return nil
}

func waitRegistered(t *testing.T, c *watchedCtx) {
	t.Helper()
	select {
	case <-c.registered:
	case <-time.After(20 * time.Second):
		t.Fatal("Read never arranged for its cancellation")
	}
}

// Every wait of Read ends on cancel, on its deadline and on Close, also
// once it is blocked in poll.
func TestReadCancellation(t *testing.T) {
	f := openFD(t, Options{Features: FeatureMissingShmem, UserMode: UserModeAll})
	msgs := make([]Msg, 1)

	ctx, cancel := context.WithCancel(context.Background())
	wctx := watched(ctx)
	errc := make(chan error, 1)
	go func() { _, err := f.Read(wctx, msgs); errc <- err }()
	waitRegistered(t, wctx)
	cancel()
	if err := recvErr(t, errc); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Read: %v", err)
	}
	if _, err := f.Read(ctx, msgs); !errors.Is(err, context.Canceled) {
		t.Fatalf("Read with a cancelled context: %v", err)
	}

	dctx, dcancel := context.WithTimeout(context.Background(), 5*time.Millisecond)
	defer dcancel()
	if _, err := f.Read(dctx, msgs); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Read past its deadline: %v", err)
	}

	live, stop := context.WithCancel(context.Background()) // never cancelled: a nil Done would register nothing
	defer stop()
	cctx := watched(live)
	go func() { _, err := f.Read(cctx, msgs); errc <- err }()
	waitRegistered(t, cctx)
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := recvErr(t, errc); !errors.Is(err, ErrClosed) {
		t.Fatalf("Read during Close: %v", err)
	}
	if _, err := f.Read(context.Background(), msgs); !errors.Is(err, ErrClosed) {
		t.Fatalf("Read after Close: %v", err)
	}
}

func TestOpenErrorReason(t *testing.T) {
	for _, c := range []struct {
		e    OpenError
		want string
	}{
		{OpenError{Errno: unix.ENOSYS}, "CONFIG_USERFAULTFD"},
		{OpenError{Errno: unix.EPERM}, "vm.unprivileged_userfaultfd"},
		{OpenError{Errno: unix.EINVAL, UserModeOnly: true}, "5.11"},
	} {
		err := error(&c.e)
		if !bytes.Contains([]byte(err.Error()), []byte(c.want)) || !errors.Is(err, c.e.Errno) {
			t.Errorf("%v: message %q lacks %q or does not wrap the errno", c.e.Errno, err, c.want)
		}
	}
}
