package loaders

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/migctl/migctl/guards"
	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/multifd"
	"github.com/migctl/migctl/transport"
)

// received records which pages of each block have arrived, as QEMU's
// receivedmap: a zero page is cleared only if a page arrived there before
// (otherwise the destination's fresh memory is already zero, and touching
// it would only fault it in). The main loop and every multifd reader set
// bits concurrently: words are atomic.
type received [][]atomic.Uint64

func newReceived(blocks []*guest.Block) received {
	r := make(received, len(blocks))
	for i, b := range blocks {
		r[i] = make([]atomic.Uint64, guest.BitmapWords(b.Pages()))
	}
	return r
}

// mark sets page p of block bi and reports whether it was set before.
func (r received) mark(bi, p int) (was bool) {
	w, bit := &r[bi][p/64], uint64(1)<<(p%64)
	return w.Or(bit)&bit != 0
}

// multifdIn is the destination's half of multifd: one reader goroutine
// per channel applying its packets' pages straight into guest RAM, outside
// the controller lock and in parallel, and the per-pass barrier the main
// stream's FLUSH records wait on.
type multifdIn struct {
	sync    *multifd.RecvSync
	wg      sync.WaitGroup
	errMu   sync.Mutex
	err     error // the first reader error
	done    chan struct{}
	pages   atomic.Uint64 // normal pages applied
	zeros   atomic.Uint64 // zero entries applied
	conns   []transport.Conn
	readers []*multifd.Reader
	abort   context.CancelCauseFunc // ends the whole incoming migration
}

// startMultifd accepts the multifd channels the frozen configuration asks
// for and starts their readers.
func (l *loader) startMultifd(cfg guards.Config, early []transport.Conn) error {
	n, err := strconv.Atoi(cfg.Params["multifd-channels"])
	if err != nil || n < 1 {
		closeAll(early)
		return fmt.Errorf("multifd-channels %q: want a channel count of at least 1", cfg.Params["multifd-channels"])
	}
	comp, err := multifd.ParseCompression(cfg.Params["multifd-compression"])
	if err != nil {
		closeAll(early)
		return err
	}
	var uuid [16]byte // the guest's UUID: all zero until guests carry one
	conns, err := l.acceptMultifd(early, n, uuid)
	if err != nil {
		return err
	}
	mf := &multifdIn{sync: multifd.NewRecvSync(n), done: make(chan struct{}), conns: conns, abort: l.in.cancelIO}
	l.mf = mf
	lim := multifd.Limits{PageSize: l.stats.PageSize, Blocks: map[string]uint64{}, Compression: comp}
	for name, b := range l.blocks {
		lim.Blocks[name] = uint64(len(b.Mem))
	}
	for id, c := range conns {
		r, err := multifd.NewReader(c, id, lim)
		if err != nil {
			return err
		}
		mf.readers = append(mf.readers, r)
		stop := context.AfterFunc(l.in.ioCtx, func() { c.Close() })
		mf.wg.Add(1)
		go func() {
			defer mf.wg.Done()
			defer stop()
			defer r.Close()
			if err := l.readChannel(id, r); err != nil {
				mf.fail(err)
			}
		}()
	}
	go func() { mf.wg.Wait(); close(mf.done) }()
	// The main stream is quiet while the channels carry the pages: publish
	// their progress on a ticker rather than only between main records.
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		t := time.NewTicker(l.in.opts.StatsInterval)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				l.publish(false, nil)
			case <-mf.done:
				return
			case <-l.in.ioCtx.Done():
				return
			}
		}
	}()
	return nil
}

// received returns the bytes read on every channel so far.
func (mf *multifdIn) received() uint64 {
	var n uint64
	for _, r := range mf.readers {
		n += r.Stats().Bytes
	}
	return n
}

func (mf *multifdIn) fail(err error) {
	mf.errMu.Lock()
	defer mf.errMu.Unlock()
	if mf.err == nil {
		mf.err = err
		closeAll(mf.conns) // the other readers stop too
		mf.abort(err)      // and the main stream, wherever it waits
	}
}

func (mf *multifdIn) failure() error {
	mf.errMu.Lock()
	defer mf.errMu.Unlock()
	if mf.err == errStopped {
		return nil
	}
	return mf.err
}

// readChannel applies one channel's packets until the source half-closes
// it after the final pass.
func (l *loader) readChannel(id int, r *multifd.Reader) error {
	mf := l.mf
	ps := l.stats.PageSize
	for {
		h, err := r.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("multifd channel %d: %w", id, err)
		}
		l.dog.Feed()
		if len(h.Normal)+len(h.Zero) > 0 {
			b, ok := l.blocks[h.Block]
			if !ok {
				return fmt.Errorf("multifd channel %d: block %q is not one of this guest's", id, h.Block)
			}
			bi := l.index[h.Block]
			err := r.ReadPages(func(_ int, off uint64) []byte {
				l.recv.mark(bi, int(off/ps))
				return b.Mem[off : off+ps : off+ps]
			})
			if err != nil {
				return fmt.Errorf("multifd channel %d: %w", id, err)
			}
			if l.pageSums != nil {
				for _, off := range h.Normal {
					l.pageSums[bi][off/ps] = guest.PageSum(b.Mem[off : off+ps])
				}
			}
			for _, off := range h.Zero {
				if l.recv.mark(bi, int(off/ps)) {
					clear(b.Mem[off : off+ps])
				}
				if l.pageSums != nil {
					l.pageSums[bi][off/ps] = l.zeroSum
				}
			}
			mf.pages.Add(uint64(len(h.Normal)))
			mf.zeros.Add(uint64(len(h.Zero)))
		}
		if h.Sync() {
			if err := mf.sync.Arrive(l.in.ioCtx, id); err != nil {
				return err
			}
		}
	}
}

// stop closes the channels and waits for the readers (the run ended).
func (mf *multifdIn) stop() {
	mf.errMu.Lock()
	if mf.err == nil {
		mf.err = errStopped // a reader's error from here on is only the close
	}
	mf.errMu.Unlock()
	closeAll(mf.conns)
	<-mf.done
}

var errStopped = errors.New("multifd channels closed")
