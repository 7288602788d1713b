package postcopy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/bits"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/uffd"
	"golang.org/x/sys/unix"
)

// Region is one block of guest RAM as the fault service sees it.
type Region struct {
	Name      string // block name, for errors
	Addr      uint64 // where the block is mapped in the vCPU process (page aligned)
	Len       uint64 // bytes, a multiple of PageSize
	PageSize  int    // a power of two; 4096 for the built-in guest
	MemFD     int    // the memfd backing the block (PunchHoles needs it), or -1
	MemOffset int64  // offset in MemFD of the page at Addr
	// Received has one bit per page (at least guest.BitmapWords(pages)
	// words). The service sets a bit with an atomic OR after the page is
	// installed; it may be shared memory that outlives this process.
	Received guest.Bitmap
}

func (r *Region) pages() int { return int(r.Len / uint64(r.PageSize)) }

// Request asks the source for Count pages of region Region from page Page.
// Urgent marks the one page a thread is blocked on; the batch of neighbours
// that follows it is not urgent.
type Request struct {
	Region int
	Page   int
	Count  int
	Urgent bool
}

// Options configure a [Service].
type Options struct {
	// Request is called on the fault thread for every page to fetch. It must
	// not block: queue the request (e.g. on the return path) and return.
	// Pages arrive later through Place/PlaceRun.
	Request func(Request)
	// Batch is the number of pages in the aligned batch of neighbours
	// requested after a faulting page (the faulting page is always
	// requested alone first). 0 means 16 (64 KiB of 4 KiB pages); 1 turns
	// neighbour requests off.
	Batch int
	// VCPUThreads are the vCPU threads' ids, for per-vCPU and all-vCPU
	// blocktime (needs a userfaultfd with uffd.FeatureThreadID).
	VCPUThreads []int
	// ReadBatch is how many messages one read takes; 0 means 64.
	ReadBatch int
}

// Errors callers branch on.
var (
	// ErrStrayFault: a fault outside every region (the userfaultfd has
	// registrations the service was not told about).
	ErrStrayFault = errors.New("postcopy: fault outside every guest RAM region")
	// ErrRunning: Run was called while it already runs.
	ErrRunning = errors.New("postcopy: the fault service is already running")
)

type pageKey struct{ region, page int }

type waiter struct {
	tid   uint32
	start time.Time
}

// Service resolves the faults of a guest whose RAM is registered with a
// userfaultfd. Create it with [New]; call [Service.PunchHoles] (once, before
// the guest runs), run [Service.Run] on its own goroutine, and install pages
// with [Service.Place] and [Service.PlaceRun] from any goroutine.
//
// The service does not own the userfaultfd: close it after Run returns.
type Service struct {
	fd      *uffd.FD
	regions []Region
	opts    Options
	zero    []guest.Bitmap // pages known to be zero; set by MarkZero before Run, read by the fault thread
	running atomic.Bool

	// mu guards waiting, requested, stats and bt. The received bitmaps are
	// not under it: they are written with atomic ORs, and every writer sets
	// a bit BEFORE it takes mu to complete the page's waiters, while the
	// fault thread re-checks the bit under mu before it adds a waiter, so a
	// page is either seen present or its waiter is completed.
	mu        sync.Mutex
	waiting   map[pageKey][]waiter
	requested map[pageKey]bool // urgent request sent, page not yet installed
	stats     Stats
	bt        blocktime
}

// New builds a service for fd over regions (in the order of the guest's
// blocks; Request indexes them). It checks the layout: regions page
// aligned, not overlapping, bitmaps large enough.
func New(fd *uffd.FD, regions []Region, opts Options) (*Service, error) {
	if fd == nil {
		return nil, errors.New("postcopy: New: nil userfaultfd")
	}
	if opts.Request == nil {
		return nil, errors.New("postcopy: New: Options.Request is nil: the service must be able to ask for pages")
	}
	if opts.Batch <= 0 {
		opts.Batch = 16
	}
	if opts.ReadBatch <= 0 {
		opts.ReadBatch = 64
	}
	s := &Service{fd: fd, regions: regions, opts: opts, waiting: map[pageKey][]waiter{}, requested: map[pageKey]bool{}}
	for i, r := range regions {
		ps := uint64(r.PageSize)
		switch {
		case r.PageSize < 512 || r.PageSize&(r.PageSize-1) != 0:
			return nil, fmt.Errorf("postcopy: region %q: page size %d is not a power of two >= 512", r.Name, r.PageSize)
		case r.Len == 0 || r.Len%ps != 0 || r.Addr%ps != 0:
			return nil, fmt.Errorf("postcopy: region %q: address %#x and length %d must be non-zero multiples of the page size %d", r.Name, r.Addr, r.Len, r.PageSize)
		case len(r.Received) < guest.BitmapWords(r.pages()):
			return nil, fmt.Errorf("postcopy: region %q: received bitmap has %d words for %d pages", r.Name, len(r.Received), r.pages())
		}
		for j := range i {
			o := regions[j]
			if r.Addr < o.Addr+o.Len && o.Addr < r.Addr+r.Len {
				return nil, fmt.Errorf("postcopy: regions %q and %q overlap", o.Name, r.Name)
			}
		}
		s.zero = append(s.zero, guest.NewBitmap(r.pages()))
	}
	s.bt, s.stats.VCPU = newBlocktime(opts.VCPUThreads)
	return s, nil
}

// Received reports whether page p of region r is installed.
func (s *Service) Received(r, p int) bool {
	return atomic.LoadUint64(&s.regions[r].Received[p>>6])&(1<<(uint(p)&63)) != 0
}

// MarkReceived records that page p of region r is present: the loader wrote
// it through migctl's mapping before the guest ran (precopy). Call it after
// the page is complete.
func (s *Service) MarkReceived(r, p int) { s.regions[r].Received.SetAtomic(p) }

// MarkZero records that page p of region r is a zero page the source will
// not send: a fault on it is resolved at once with UFFDIO_ZEROPAGE. Call it
// before Run.
func (s *Service) MarkZero(r, p int) { s.zero[r].Set(p) }

// ReceivedCount returns the number of pages installed in region r.
func (s *Service) ReceivedCount(r int) int {
	n := 0
	for i := range s.regions[r].Received {
		n += bits.OnesCount64(atomic.LoadUint64(&s.regions[r].Received[i]))
	}
	return n
}

// Complete reports whether every page of every region is installed.
func (s *Service) Complete() bool {
	for i, r := range s.regions {
		if s.ReceivedCount(i) != r.pages() {
			return false
		}
	}
	return true
}

// Stats returns a snapshot of the counters and blocktime statistics.
func (s *Service) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stats
	st.VCPU = append([]VCPUStats(nil), s.stats.VCPU...)
	for _, w := range s.waiting {
		st.Pending += len(w)
	}
	return st
}

// Run reads fault messages and answers them until ctx ends (it returns
// ctx's error), the userfaultfd is closed ([uffd.ErrClosed]) or an ioctl
// fails. It locks its goroutine to an OS thread for its whole life.
func (s *Service) Run(ctx context.Context) error {
	if !s.running.CompareAndSwap(false, true) {
		return ErrRunning
	}
	defer s.running.Store(false)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	msgs := make([]uffd.Msg, s.opts.ReadBatch)
	for {
		n, err := s.fd.Read(ctx, msgs)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("postcopy: reading faults: %w", err)
		}
		now := time.Now()
		for _, m := range msgs[:n] {
			if err := s.fault(m, now); err != nil {
				return err
			}
		}
	}
}

// locate maps an address of the vCPU process to (region, page).
func (s *Service) locate(addr uint64) (int, int, bool) {
	for i := range s.regions {
		r := &s.regions[i]
		if addr >= r.Addr && addr < r.Addr+r.Len {
			return i, int((addr - r.Addr) / uint64(r.PageSize)), true
		}
	}
	return 0, 0, false
}

func (s *Service) pageRange(r, p, n int) uffd.Range {
	reg := &s.regions[r]
	ps := uint64(reg.PageSize)
	return uffd.Range{Start: reg.Addr + uint64(p)*ps, Len: uint64(n) * ps}
}

// fault handles one message read at now.
func (s *Service) fault(m uffd.Msg, now time.Time) error {
	if m.Event != uffd.EventPagefault {
		return fmt.Errorf("postcopy: unexpected %v message: the userfaultfd enabled event features the service does not handle", m.Event)
	}
	r, p, ok := s.locate(m.Address)
	if !ok {
		return fmt.Errorf("postcopy: fault at %#x by thread %d: %w", m.Address, m.TID, ErrStrayFault)
	}
	s.mu.Lock()
	s.stats.Faults++
	s.mu.Unlock()
	if s.Received(r, p) {
		return s.wake(r, p)
	}
	if s.zero[r].Test(p) {
		return s.placeZero(r, p)
	}
	key := pageKey{r, p}
	s.mu.Lock()
	if s.Received(r, p) { // installed between the first look and the lock
		s.mu.Unlock()
		return s.wake(r, p)
	}
	ws := s.waiting[key]
	dup := false
	for _, w := range ws {
		dup = dup || w.tid == m.TID
	}
	if !dup { // a fault retried after a signal is the same wait
		s.waiting[key] = append(ws, waiter{tid: m.TID, start: now})
		s.bt.begin(m.TID, now)
	}
	first := !s.requested[key]
	s.requested[key] = true
	if first {
		s.stats.Requests++
	}
	s.mu.Unlock()
	if !first {
		return nil
	}
	s.opts.Request(Request{Region: r, Page: p, Count: 1, Urgent: true})
	if b := s.opts.Batch; b > 1 {
		lo := p - p%b
		hi := min(lo+b, s.regions[r].pages())
		for lo < hi && (lo == p || s.Received(r, lo)) {
			lo++
		}
		for hi > lo && (hi-1 == p || s.Received(r, hi-1)) {
			hi--
		}
		if lo < hi {
			s.mu.Lock()
			s.stats.Prefetches++
			s.mu.Unlock()
			s.opts.Request(Request{Region: r, Page: lo, Count: hi - lo})
		}
	}
	return nil
}

func (s *Service) wake(r, p int) error {
	s.mu.Lock()
	s.stats.Wakes++
	s.mu.Unlock()
	if err := s.fd.Wake(s.pageRange(r, p, 1)); err != nil {
		return fmt.Errorf("postcopy: %s page %d: %w", s.regions[r].Name, p, err)
	}
	return nil
}

func (s *Service) placeZero(r, p int) error {
	res, err := s.fd.ZeroPages(s.pageRange(r, p, 1), s.regions[r].PageSize, 0)
	if err != nil {
		return fmt.Errorf("postcopy: zero page %s page %d: %w", s.regions[r].Name, p, err)
	}
	s.mu.Lock()
	s.stats.ZeroFaults++
	s.mu.Unlock()
	s.installed(r, p, 1, res, time.Now())
	if len(res.Existing) > 0 { // present after all: the fault still needs its wake
		return s.wake(r, p)
	}
	return nil
}

// Place installs page p of region r with data (PageSize bytes) unless it is
// already present, and wakes the threads waiting on it. An all-zero page is
// installed with UFFDIO_ZEROPAGE. It is safe to call from any goroutine, at
// the same time as the fault thread and other Place calls.
func (s *Service) Place(r, p int, data []byte) error {
	_, err := s.PlaceRun(r, p, data)
	return err
}

// PlaceRun installs the pages of data (a whole number of pages) at page
// first of region r and onwards, skipping pages already present; each
// maximal run of missing pages goes in with one UFFDIO_COPY where the
// kernel allows. It returns the number of pages it installed.
func (s *Service) PlaceRun(r, first int, data []byte) (int, error) {
	if r < 0 || r >= len(s.regions) {
		return 0, fmt.Errorf("postcopy: region %d out of range 0..%d", r, len(s.regions)-1)
	}
	reg := &s.regions[r]
	ps := reg.PageSize
	n := len(data) / ps
	if len(data)%ps != 0 || first < 0 || n == 0 || first+n > reg.pages() {
		return 0, fmt.Errorf("postcopy: %s: %d bytes at page %d do not fit its %d pages of %d bytes", reg.Name, len(data), first, reg.pages(), ps)
	}
	installed := 0
	for i := 0; i < n; {
		if s.Received(r, first+i) {
			i++
			continue
		}
		j := i + 1
		for j < n && !s.Received(r, first+j) {
			j++
		}
		k, err := s.install(r, first+i, data[i*ps:j*ps])
		installed += k
		if err != nil {
			return installed, err
		}
		i = j
	}
	return installed, nil
}

// install puts a run of missing pages in with one copy (zero runs with
// UFFDIO_ZEROPAGE) and records them.
func (s *Service) install(r, p int, data []byte) (int, error) {
	reg := &s.regions[r]
	var res uffd.CopyResult
	var err error
	if isZero(data) {
		res, err = s.fd.ZeroPages(s.pageRange(r, p, len(data)/reg.PageSize), reg.PageSize, 0)
	} else {
		res, err = s.fd.CopyPages(s.pageRange(r, p, 0).Start, data, reg.PageSize, 0)
	}
	if err != nil {
		return res.Installed, fmt.Errorf("postcopy: install %s pages %d..%d: %w", reg.Name, p, p+len(data)/reg.PageSize-1, err)
	}
	s.installed(r, p, len(data)/reg.PageSize, res, time.Now())
	return res.Installed, nil
}

// installed marks n pages from p received (each is present now, installed
// by this call or found existing) and completes their waiters at t.
func (s *Service) installed(r, p, n int, res uffd.CopyResult, t time.Time) {
	for i := range n {
		s.regions[r].Received.SetAtomic(p + i)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stats.Installed += uint64(res.Installed)
	s.stats.Existing += uint64(len(res.Existing))
	for i := range n {
		key := pageKey{r, p + i}
		for _, w := range s.waiting[key] {
			s.bt.end(&s.stats, w.tid, t, t.Sub(w.start))
		}
		delete(s.waiting, key)
		delete(s.requested, key)
	}
}

// Pending returns an urgent request for every page a thread is waiting on:
// what to send again after the link to the source was rebuilt (QEMU re-sends
// REQ_PAGES for every pending fault after RESUME_ACK).
func (s *Service) Pending() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Request
	for k := range s.waiting {
		out = append(out, Request{Region: k.region, Page: k.page, Count: 1, Urgent: true})
	}
	return out
}

// WakeAll wakes every thread blocked on a fault in any region. A thread
// whose page is still missing faults again, with a new message. A service
// that takes over a userfaultfd from a handler that died calls it once Run
// is running: faults its predecessor read but never resolved are raised
// again and reach this service.
func (s *Service) WakeAll() error {
	for i, r := range s.regions {
		if err := s.fd.Wake(uffd.Range{Start: r.Addr, Len: r.Len}); err != nil {
			return fmt.Errorf("postcopy: wake %s: %w", s.regions[i].Name, err)
		}
	}
	return nil
}

// PunchHoles makes every page that is not in the received bitmap a hole
// again (fallocate PUNCH_HOLE on the memfd), so that a page pre-faulted but
// never received faults in the guest instead of reading as zeros — what
// QEMU does with discard at POSTCOPY_ADVISE. Call it once the pre-faulter
// has stopped and before the guest runs on the destination: a page the
// guest has written must never be punched. It returns the number of pages
// punched (holes included).
func (s *Service) PunchHoles() (int, error) {
	punched := 0
	for i := range s.regions {
		r := &s.regions[i]
		if r.MemFD < 0 {
			return punched, fmt.Errorf("postcopy: PunchHoles: region %q has no memfd", r.Name)
		}
		n := r.pages()
		for p := 0; p < n; {
			if s.Received(i, p) {
				p++
				continue
			}
			q := p + 1
			for q < n && !s.Received(i, q) {
				q++
			}
			off := r.MemOffset + int64(p)*int64(r.PageSize)
			length := int64(q-p) * int64(r.PageSize)
			if err := unix.Fallocate(r.MemFD, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length); err != nil {
				return punched, fmt.Errorf("postcopy: punch %s pages %d..%d: %w", r.Name, p, q-1, err)
			}
			punched += q - p
			p = q
		}
	}
	return punched, nil
}

var zeroChunk [64 << 10]byte

func isZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroChunk))
		if !bytes.Equal(b[:n], zeroChunk[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// Discard makes n pages from page p of region r not received again (QEMU's
// POSTCOPY_RAM_DISCARD: the source will send them again): their received
// bits and zero marks are cleared, and PunchHoles turns them into holes.
// Call it before Run.
func (s *Service) Discard(r, p, n int) error {
	reg := &s.regions[r]
	if p < 0 || n < 0 || p+n > reg.pages() {
		return fmt.Errorf("postcopy: discard %s pages %d..%d: outside its %d pages", reg.Name, p, p+n-1, reg.pages())
	}
	for i := p; i < p+n; i++ {
		atomic.AndUint64(&reg.Received[i>>6], ^(uint64(1) << (uint(i) & 63)))
		s.zero[r].Clear(i)
	}
	return nil
}

// PlaceZeros installs, with UFFDIO_ZEROPAGE, every page marked zero
// (MarkZero) that is not received, so that only pages the source still
// sends remain holes. It returns the pages it installed. Call it after
// PunchHoles, before the guest runs.
func (s *Service) PlaceZeros() (int, error) {
	installed := 0
	for i := range s.regions {
		reg := &s.regions[i]
		n := reg.pages()
		for p := 0; p < n; {
			if !s.zero[i].Test(p) || s.Received(i, p) {
				p++
				continue
			}
			q := p + 1
			for q < n && s.zero[i].Test(q) && !s.Received(i, q) {
				q++
			}
			res, err := s.fd.ZeroPages(s.pageRange(i, p, q-p), reg.PageSize, 0)
			if err != nil {
				return installed, fmt.Errorf("postcopy: zero %s pages %d..%d: %w", reg.Name, p, q-1, err)
			}
			s.installed(i, p, q-p, res, time.Now())
			installed += res.Installed
			p = q
		}
	}
	return installed, nil
}

// FillHoles installs a zero page, with UFFDIO_ZEROPAGE, in every hole of
// the regions' memfds (found with SEEK_HOLE and SEEK_DATA, never by
// reading), and marks every page received. A precopy migration into a
// guest whose RAM is registered for MISSING faults calls it before the
// guest runs: a zero page the stream never wrote is still a hole, and a
// vCPU touching it would wait for a fault service that does not run. It
// returns the pages it installed.
func (s *Service) FillHoles() (int, error) {
	installed := 0
	for i := range s.regions {
		reg := &s.regions[i]
		if reg.MemFD < 0 {
			return installed, fmt.Errorf("postcopy: FillHoles: region %q has no memfd", reg.Name)
		}
		holes, err := Holes(reg.MemFD, reg.MemOffset, int64(reg.Len), reg.PageSize)
		if err != nil {
			return installed, fmt.Errorf("postcopy: %s: %w", reg.Name, err)
		}
		for _, h := range holes {
			res, err := s.fd.ZeroPages(s.pageRange(i, h.First, h.Count), reg.PageSize, 0)
			if err != nil {
				return installed, fmt.Errorf("postcopy: zero %s pages %d..%d: %w", reg.Name, h.First, h.First+h.Count-1, err)
			}
			installed += res.Installed
		}
		for p := range reg.pages() {
			reg.Received.SetAtomic(p)
		}
	}
	return installed, nil
}

// Rebuild reconciles the received bitmaps with the memfds, for a service
// that takes over a guest whose previous handler died (`migctl serve
// --destination --reattach`). It never reads guest memory: it finds the
// holes with lseek SEEK_DATA and SEEK_HOLE ([Holes]), since reading a hole
// would fill it with a page of zeros.
//
// It is meant for a guest past POSTCOPY_LISTEN: from then on every page that
// is not a hole was received (PunchHoles made every other page a hole) or
// installed whole by UFFDIO_COPY or UFFDIO_ZEROPAGE, atomically, perhaps by
// a handler that died before it set the page's bit. Such a page is marked
// (marked counts them). A page whose bit is set but which is a hole cannot
// have been received (bits are set after the page is in place): its bit is
// cleared so that the page is requested again (cleared counts them). Call
// it before Run.
func (s *Service) Rebuild() (marked, cleared int, err error) {
	for i := range s.regions {
		reg := &s.regions[i]
		if reg.MemFD < 0 {
			return marked, cleared, fmt.Errorf("postcopy: Rebuild: region %q has no memfd", reg.Name)
		}
		holes, err := Holes(reg.MemFD, reg.MemOffset, int64(reg.Len), reg.PageSize)
		if err != nil {
			return marked, cleared, fmt.Errorf("postcopy: %s: %w", reg.Name, err)
		}
		n := reg.pages()
		p := 0
		mark := func(to int) { // pages p..to-1 are present
			for ; p < to; p++ {
				if !s.Received(i, p) {
					reg.Received.SetAtomic(p)
					marked++
				}
			}
		}
		for _, h := range holes {
			mark(min(h.First, n))
			for ; p < min(h.First+h.Count, n); p++ {
				if s.Received(i, p) {
					atomic.AndUint64(&reg.Received[p>>6], ^(uint64(1) << (uint(p) & 63)))
					cleared++
				}
			}
		}
		mark(n)
	}
	return marked, cleared, nil
}

// PageRun is a run of Count pages from page First.
type PageRun struct{ First, Count int }

// Holes returns the runs of pages of the length bytes of memfd fd from
// offset off that are holes (no page in the page cache), using lseek's
// SEEK_DATA and SEEK_HOLE: it never reads the memory, so it never turns a
// hole into a page. Pages are pageSize bytes; a partly present page counts
// as present.
func Holes(fd int, off, length int64, pageSize int) ([]PageRun, error) {
	ps := int64(pageSize)
	end := off + length
	var out []PageRun
	for pos := off; pos < end; {
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if err == unix.ENXIO { // no data after pos: the rest is a hole
			data = end
		} else if err != nil {
			return out, fmt.Errorf("lseek SEEK_DATA at %d: %w", pos, err)
		}
		data = min(data, end)
		if first, last := (pos-off+ps-1)/ps, (data-off)/ps; last > first {
			out = append(out, PageRun{First: int(first), Count: int(last - first)})
		}
		if data >= end {
			break
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return out, fmt.Errorf("lseek SEEK_HOLE at %d: %w", data, err)
		}
		pos = (hole-off+ps-1)/ps*ps + off // a partly present page counts as present
	}
	return out, nil
}

// ReceivedWords returns a copy of region r's received bitmap (QEMU's
// RECV_BITMAP answer after a recovery).
func (s *Service) ReceivedWords(r int) []uint64 {
	reg := &s.regions[r]
	out := make([]uint64, guest.BitmapWords(reg.pages()))
	for i := range out {
		out[i] = atomic.LoadUint64(&reg.Received[i])
	}
	return out
}

// Regions returns the number of regions.
func (s *Service) Regions() int { return len(s.regions) }
