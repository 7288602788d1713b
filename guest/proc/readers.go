package proc

import (
	"encoding/binary"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/migctl/migctl/guest"
	"golang.org/x/sys/unix"
)

// readers are the reader vCPUs of a guest process. Each is a goroutine
// locked to its own OS thread for its whole life (so its thread id names a
// vCPU in fault messages). While the guest runs, reader i sweeps the pages
// whose global number is i modulo n, in a random order fixed per reader:
// it touches each page's first word (a plain load: the fault, if any,
// happens there, at an ordinary preemptible instruction), times that first
// touch during its first pass, and checks the page with guest.LostPage.
type readers struct {
	g      *guest.Builtin
	blocks []*guest.Block
	base   []int // global number of each block's first page
	n      int
	tids   []int

	pagesRead atomic.Uint64
	lost      atomic.Uint64
	firstLost atomic.Uint64 // 1 + (block<<40 | page) of the first lost page, 0 if none

	// touch[i] holds reader i's first-pass first-touch latencies (ns);
	// touched[i] how many are valid. Reader i stores, anyone loads.
	touch   [][]atomic.Int64
	touched []atomic.Int64

	mu      sync.Mutex // guards passes, changed, stop, wg's Add
	passes  []int
	changed chan struct{} // closed and replaced whenever a pass completes
	stop    *atomic.Bool  // the current run's stop flag; nil when not running
	wg      sync.WaitGroup

	runs []chan *atomic.Bool // per reader: the next run's stop flag; closed at exit
	sink atomic.Uint64       // keeps the loads alive
}

func newReaders(g *guest.Builtin, n int, seed uint64) *readers {
	r := &readers{g: g, blocks: g.Blocks(), n: n, changed: make(chan struct{}), passes: make([]int, n)}
	total := 0
	for _, b := range r.blocks {
		r.base = append(r.base, total)
		total += b.Pages()
	}
	tids := make(chan int, n)
	for i := range n {
		var order []int
		for gp := i; gp < total; gp += n {
			order = append(order, gp)
		}
		rng := rand.New(rand.NewPCG(seed, uint64(i)))
		rng.Shuffle(len(order), func(a, b int) { order[a], order[b] = order[b], order[a] })
		r.touch = append(r.touch, make([]atomic.Int64, len(order)))
		run := make(chan *atomic.Bool, 1)
		r.runs = append(r.runs, run)
		go r.loop(i, order, run, tids)
	}
	r.touched = make([]atomic.Int64, n)
	for range n {
		r.tids = append(r.tids, <-tids)
	}
	slices.Sort(r.tids)
	return r
}

// locate maps a global page number to (block, page).
func (r *readers) locate(gp int) (int, int) {
	b := len(r.base) - 1
	for r.base[b] > gp {
		b--
	}
	return b, gp - r.base[b]
}

func (r *readers) loop(i int, order []int, runs <-chan *atomic.Bool, tids chan<- int) {
	runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
	tids <- unix.Gettid()
	first := true
	var sink uint64
	for stop := range runs {
		for !stop.Load() {
			for k, gp := range order {
				if stop.Load() {
					break
				}
				b, p := r.locate(gp)
				page := r.blocks[b].Page(p)
				t0 := time.Now()
				sink += binary.LittleEndian.Uint64(page[:8]) // the first touch
				lat := time.Since(t0)
				if first {
					r.touch[i][k].Store(int64(lat))
					r.touched[i].Store(int64(k + 1))
				}
				if r.g.LostPage(b, p, page) {
					r.lost.Add(1)
					r.firstLost.CompareAndSwap(0, 1+uint64(b)<<40|uint64(p))
				}
				r.pagesRead.Add(1)
				if k == len(order)-1 {
					first = false
					r.passDone(i)
				}
			}
			if len(order) == 0 {
				r.passDone(i)
				break
			}
		}
		r.sink.Add(sink)
		r.wg.Done()
	}
}

func (r *readers) passDone(i int) {
	r.mu.Lock()
	r.passes[i]++
	close(r.changed)
	r.changed = make(chan struct{})
	r.mu.Unlock()
}

// start runs every reader (if not running).
func (r *readers) start() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.stop != nil || r.n == 0 {
		return
	}
	r.stop = new(atomic.Bool)
	r.wg.Add(r.n)
	for _, run := range r.runs {
		run <- r.stop
	}
}

// halt asks the readers to stop and waits until none runs. A reader
// blocked on a missing page stops only once the page is installed.
func (r *readers) halt() {
	r.mu.Lock()
	stop := r.stop
	r.stop = nil
	r.mu.Unlock()
	if stop == nil {
		return
	}
	stop.Store(true)
	r.wg.Wait()
}

// wait returns true once every reader has completed at least passes passes,
// false if timeout passes or abort is closed first.
func (r *readers) wait(passes int, timeout time.Duration, abort <-chan struct{}) bool {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		r.mu.Lock()
		done := slices.Min(r.passes) >= passes
		ch := r.changed
		r.mu.Unlock()
		if done {
			return true
		}
		select {
		case <-ch:
		case <-t.C:
			return false
		case <-abort:
			return false
		}
	}
}

// LatencySummary summarises first-touch latencies.
type LatencySummary struct {
	Count int           `json:"count"`
	P50   time.Duration `json:"p50"`
	P99   time.Duration `json:"p99"`
	Max   time.Duration `json:"max"`
}

func (r *readers) firstTouch() LatencySummary {
	var all []int64
	for i := range r.touch {
		n := int(r.touched[i].Load())
		for k := range n {
			all = append(all, r.touch[i][k].Load())
		}
	}
	if len(all) == 0 {
		return LatencySummary{}
	}
	slices.Sort(all)
	return LatencySummary{
		Count: len(all),
		P50:   time.Duration(all[len(all)/2]),
		P99:   time.Duration(all[len(all)*99/100]),
		Max:   time.Duration(all[len(all)-1]),
	}
}

func (r *readers) passCounts() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.passes)
}
