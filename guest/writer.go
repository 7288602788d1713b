package guest

import (
	"fmt"
	"time"
)

// writerTick is how often a writer wakes to spend its byte budget.
const writerTick = 5 * time.Millisecond

// pace adds what a writer earns over elapsed at rate bytes/s, throttled by
// throttle percent, to its credit, and takes out the whole pages it may
// write now. The credit is capped at four ticks' worth (at least one page),
// so a writer that fell behind does not burst.
func pace(credit *float64, rate float64, throttle int, elapsed time.Duration) int {
	r := rate * float64(100-throttle) / 100
	limit := max(r*4*writerTick.Seconds(), PageSize)
	*credit = min(*credit+r*elapsed.Seconds(), limit)
	n := int(*credit / PageSize)
	*credit -= float64(n) * PageSize
	return n
}

// writer is vCPU w of n. It owns the pages whose global number is w modulo
// n, so that no page has two writers (two concurrent rewrites of one page
// could interleave two versions). It runs until stop is closed, checking it
// between pages.
func (g *Builtin) writer(w, n int, stop <-chan struct{}, rnd wyrand) {
	defer g.wg.Done()
	owned := (g.total - w + n - 1) / n
	if owned <= 0 {
		<-stop
		return
	}
	rate := float64(g.cfg.DirtyRate) / float64(n)
	t := time.NewTicker(writerTick)
	defer t.Stop()
	last := time.Now()
	var credit float64
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		now := time.Now()
		budget := pace(&credit, rate, int(g.throttle.Load()), now.Sub(last))
		last = now
		written, lastBlock, lastPage, lastVer := 0, 0, 0, uint32(0)
		stopped := false
		for range budget {
			select {
			case <-stop:
				stopped = true
			default:
			}
			if stopped {
				break
			}
			b, p, ok := g.pick(&rnd, w, n, owned)
			if !ok {
				continue
			}
			lastBlock, lastPage, lastVer = b, p, g.rewrite(b, p)
			written++
		}
		g.batchDone(w, written, lastBlock, lastPage, lastVer)
		if stopped {
			return
		}
	}
}

// pick chooses one of writer w's data pages at random; it gives up (false)
// after 64 zero pages in a row, which only happens when nearly all pages
// are zero.
func (g *Builtin) pick(rnd *wyrand, w, n, owned int) (block, page int, ok bool) {
	for range 64 {
		gp := int(rnd.below(uint64(owned)))*n + w
		b := len(g.base) - 1
		for g.base[b] > gp {
			b--
		}
		p := gp - g.base[b]
		if !g.content.isZero(b, p) {
			return b, p, true
		}
	}
	return 0, 0, false
}

// rewrite writes the next version of a data page, THEN marks it dirty: the
// dirty-log rule (see the package documentation).
func (g *Builtin) rewrite(block, page int) uint32 {
	p := g.blocks[block].Page(page)
	_, v := header(p)
	v++
	g.content.fill(p, block, page, v)
	g.dirty[block].SetAtomic(page)
	g.pagesWritten.Add(1)
	return v
}

// batchDone advances the devices after a writer's tick.
func (g *Builtin) batchDone(w, written, block, page int, ver uint32) {
	nb := g.batches.Add(1)
	g.timer.tick()
	if written > 0 {
		g.nic.traffic(uint64(written) * 64)
		g.serial.print(fmt.Sprintf("cpu%d: batch %d: rewrote %d pages, last %s page %d v%d",
			w, nb, written, g.blocks[block].Name, page, ver))
	}
	if g.onBatch != nil {
		g.onBatch(w, written)
	}
}
