package loaders

import (
	"context"
	"fmt"
	"runtime"
	"sync"

	"github.com/migctl/migctl/guest"
	"github.com/migctl/migctl/machine"
	"github.com/migctl/migctl/spec"
	"github.com/migctl/migctl/transport"
)

// ramReceiver is a main channel whose source writes guest RAM one-sidedly
// into this guest's memory, registered when the channel was accepted:
// rdma:'s *rdma.DestConn. The loader finds it by this interface and never
// imports package rdma. No RAM record arrives on such a stream: the RAM
// section carries only its headers and EOS, and by the channel's ordering
// guarantee every page the source wrote before a stream byte has landed
// when the loader reads that byte.
type ramReceiver interface {
	// OpenRAM lets the source register and write guest RAM; until then
	// (the connect guard has not accepted the source yet) it can do
	// neither.
	OpenRAM() error
	// RAMLanded returns nil when every RAM write the source issued before
	// the stream bytes read so far has landed, else the channel's error.
	RAMLanded() error
	// Fail fails the channel and tells the source at once, even when it is
	// blocked in a RAM write and not reading the return path.
	Fail(error)
	// Provider names the RDMA provider (x-migctl-rdma-provider).
	Provider() string
}

// provider is what a listener or channel that names its RDMA provider has.
type provider interface{ Provider() string }

// receiverOf returns c's ramReceiver, looking through the classifying
// wrapper.
func receiverOf(c transport.Conn) (ramReceiver, bool) {
	if pc, ok := c.(*peekedConn); ok {
		c = pc.Conn
	}
	r, ok := c.(ramReceiver)
	return r, ok
}

// listenWithRAM is Options.Listen's default: base (the zero Config when
// nil) with the guest's RAM added, which a transport writing RAM
// one-sidedly (rdma:) registers for the source; byte-stream transports
// ignore it.
func listenWithRAM(base *transport.Config, g guest.Guest) func(context.Context, transport.Addr) (transport.Listener, error) {
	return func(ctx context.Context, a transport.Addr) (transport.Listener, error) {
		var cfg transport.Config
		if base != nil {
			cfg = *base
		}
		for _, b := range g.Blocks() {
			cfg.RAM = append(cfg.RAM, transport.RAMBlock{Name: b.Name, Mem: b.Mem})
		}
		return cfg.Listen(ctx, a)
	}
}

// publishListener names the RDMA provider of a destination that listens
// on rdma: (x-migctl-rdma-provider while it waits for its source).
func publishListener(c *machine.Controller, ln transport.Listener) {
	if p, ok := ln.(provider); ok {
		_ = c.PublishStats(spec.Incoming, machine.Stats{RDMAProvider: p.Provider()})
	}
}

// openRAM opens guest RAM to the source's RDMA writes, once the source was
// accepted (connect) and loading starts.
func (l *loader) openRAM() error {
	r, ok := receiverOf(l.conn)
	if !ok {
		return nil
	}
	l.noteProvider(r.Provider())
	if err := r.OpenRAM(); err != nil {
		return fmt.Errorf("open guest RAM to the source's RDMA writes: %w", err)
	}
	return nil
}

func (l *loader) noteProvider(name string) {
	l.statsMu.Lock()
	l.stats.RDMAProvider = name
	l.statsMu.Unlock()
}

// ramLanded runs after the stream's EOF: over RDMA it checks that every
// page the source wrote has landed and, with Options.PageSums, computes
// the page checksums from guest memory, since no page passed through the
// loader.
func (l *loader) ramLanded() error {
	r, ok := receiverOf(l.conn)
	if !ok {
		return nil
	}
	if err := r.RAMLanded(); err != nil {
		return fmt.Errorf("RAM written by RDMA: %w", err)
	}
	if l.pageSums != nil {
		sumPages(l.in.g.Blocks(), l.pageSums)
	}
	return nil
}

// sumPages fills sums with every page's guest.PageSum, read from memory by
// up to GOMAXPROCS goroutines.
func sumPages(blocks []*guest.Block, sums [][]uint32) {
	type span struct{ b, lo, hi int }
	const per = 1024 // pages per unit of work (4 MiB of 4 KiB pages)
	work := make(chan span)
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for sp := range work {
				b := blocks[sp.b]
				for p := sp.lo; p < sp.hi; p++ {
					sums[sp.b][p] = guest.PageSum(b.Page(p))
				}
			}
		}()
	}
	for bi, b := range blocks {
		for lo := 0; lo < b.Pages(); lo += per {
			work <- span{bi, lo, min(lo+per, b.Pages())}
		}
	}
	close(work)
	wg.Wait()
}

// failRAM tells an RDMA source why the destination failed, over the
// channel's ERROR message, so a source blocked in a RAM write learns at
// once (the return path then carries nothing more).
func (l *loader) failRAM(err error) {
	if l.conn == nil {
		if p, ok := l.in.ln.(provider); ok {
			l.noteProvider(p.Provider())
		}
		return
	}
	if r, ok := receiverOf(l.conn); ok {
		l.noteProvider(r.Provider())
		r.Fail(err)
	}
}
