package rdma

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/migctl/migctl/rdma/ibv"
	"github.com/migctl/migctl/rdma/verbs"
	"github.com/migctl/migctl/transport"
)

// schemePair opens an rdma: channel through package transport, as the
// engine and the loader do: the destination's RAM registered at Listen,
// the source's RAM and pin-all given to Dial.
func schemePair(t *testing.T, host string, pinAll bool) (*SourceConn, *DestConn, []byte, []byte) {
	t.Helper()
	ctx := testCtx(t)
	src, dst := mapMem(t, 4<<20), mapMem(t, 4<<20)
	dense(src)
	l, err := (&transport.Config{RDMAProvider: "soft", RAM: []transport.RAMBlock{{Name: "pc.ram", Mem: dst}}}).
		Listen(ctx, transport.Addr{Scheme: transport.SchemeRDMA, Host: host})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if a := l.Addr(); a.Scheme != transport.SchemeRDMA || a.Port == 0 || a.Host != host {
		t.Fatalf("listener address %v: want rdma:%s with the real port", a, host)
	}
	if p, ok := l.(interface{ Provider() string }); !ok || p.Provider() != "soft" {
		t.Fatalf("listener %T does not name its provider", l)
	}
	type acc struct {
		c   transport.Conn
		err error
	}
	ch := make(chan acc, 1)
	go func() { c, err := l.Accept(ctx); ch <- acc{c, err} }()
	sc, err := (&transport.Config{RDMAProvider: "soft", PinRAM: pinAll, RAM: []transport.RAMBlock{{Name: "pc.ram", Mem: src}}}).
		Dial(ctx, l.Addr())
	a := <-ch
	if err != nil || a.err != nil {
		t.Fatalf("dial: %v; accept: %v", err, a.err)
	}
	s, d := sc.(*SourceConn), a.c.(*DestConn)
	t.Cleanup(func() { _ = s.Close(); _ = d.Close() })
	return s, d, src, dst
}

// The rdma: scheme through package transport, v4 and v6, with and without
// pin-all: the stream both ways, RAM by one-sided write once the
// destination opened it, and what the Conns say about themselves.
func TestScheme(t *testing.T) {
	for _, host := range []string{"127.0.0.1", "::1"} {
		for _, pinAll := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/pin-all=%v", host, pinAll), func(t *testing.T) {
				network := "tcp4"
				if host == "::1" {
					network = "tcp6"
				}
				loopback(t, network) // skips without it
				ctx := testCtx(t)
				s, d, src, dst := schemePair(t, host, pinAll)
				if !s.ReturnPath() || !d.ReturnPath() || s.Provider() != "soft" || d.Provider() != "soft" {
					t.Fatalf("return path %v/%v, providers %q/%q", s.ReturnPath(), d.ReturnPath(), s.Provider(), d.Provider())
				}
				if s.PinnedRAM() != pinAll || d.PinnedRAM() != pinAll {
					t.Fatalf("pin-all: source %v, destination %v, want %v (set on the source, adopted)", s.PinnedRAM(), d.PinnedRAM(), pinAll)
				}
				if _, err := s.Write([]byte("QEVM")); err != nil {
					t.Fatal(err)
				}
				head := make([]byte, 4)
				if _, err := io.ReadFull(d, head); err != nil || string(head) != "QEVM" {
					t.Fatalf("stream: %q, %v", head, err)
				}
				if err := d.OpenRAM(); err != nil {
					t.Fatal(err)
				}
				if err := s.WriteRAM(ctx, "pc.ram", 1<<20, src[1<<20:3<<20]); err != nil {
					t.Fatal(err)
				}
				if err := s.WriteZero(ctx, "pc.ram", 0, 4096); err != nil {
					t.Fatal(err)
				}
				if _, err := s.Write([]byte("EOS")); err != nil { // after the RAM: it lands first
					t.Fatal(err)
				}
				eos := make([]byte, 3)
				if _, err := io.ReadFull(d, eos); err != nil || string(eos) != "EOS" {
					t.Fatalf("stream: %q, %v", eos, err)
				}
				if !bytes.Equal(dst[1<<20:3<<20], src[1<<20:3<<20]) {
					t.Fatal("the RAM written before the stream bytes had not landed when they were read")
				}
				if err := d.RAMLanded(); !errors.Is(err, ErrNoPassEnd) {
					t.Fatalf("RAMLanded before the source ended a pass: %v; want ErrNoPassEnd", err)
				}
				if err := s.SyncRAM(ctx); err != nil {
					t.Fatal(err)
				}
				if _, err := s.Write([]byte("EOF")); err != nil {
					t.Fatal(err)
				}
				if _, err := io.ReadFull(d, eos); err != nil || string(eos) != "EOF" {
					t.Fatalf("stream: %q, %v", eos, err)
				}
				if err := d.RAMLanded(); err != nil {
					t.Fatalf("RAMLanded after the source's Sync and later stream bytes: %v", err)
				}
				if s.RAMBytes() < 2<<20 {
					t.Errorf("RAMBytes %d, want at least the 2 MiB written", s.RAMBytes())
				}
				// The return path.
				if _, err := d.Write([]byte("SHUT")); err != nil {
					t.Fatal(err)
				}
				shut := make([]byte, 4)
				if _, err := io.ReadFull(s, shut); err != nil || string(shut) != "SHUT" {
					t.Fatalf("return path: %q, %v", shut, err)
				}
			})
		}
	}
}

// Deadlines as net.Conn's: a passed deadline fails Read with
// os.ErrDeadlineExceeded without breaking the channel, moving it wakes a
// pending Read, and clearing it lets Read wait again.
func TestSchemeDeadline(t *testing.T) {
	s, d, _, _ := schemePair(t, "127.0.0.1", false)
	_ = d.SetDeadline(time.Now().Add(-time.Second))
	first := make(chan error, 1)
	go func() { _, err := d.Read(make([]byte, 1)); first <- err }()
	select {
	case err := <-first:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("Read past the deadline: %v; want os.ErrDeadlineExceeded", err)
		}
	case <-time.After(30 * time.Second): // a failure bound, not synchronisation
		_ = d.Close()
		t.Fatal("Read past the deadline waited: the deadline is ignored")
	}
	_ = d.SetDeadline(time.Time{})
	errc := make(chan error, 1)
	go func() { _, err := d.Read(make([]byte, 1)); errc <- err }()
	waitFor(t, func() bool { return d.d.e.waiters() > 0 })
	_ = d.SetDeadline(time.Now()) // applies to the pending Read
	if err := <-errc; !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("pending Read after SetDeadline(now): %v", err)
	}
	_ = d.SetDeadline(time.Time{})
	if _, err := s.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Read(make([]byte, 1)); err != nil {
		t.Fatalf("Read after clearing the deadline: %v (the channel must survive a deadline)", err)
	}
}

// What the scheme refuses: no RAM (it must know what to register), an
// unknown provider, and verbs without a device — never replaced by soft.
func TestSchemeRefusals(t *testing.T) {
	ctx := testCtx(t)
	a := transport.Addr{Scheme: transport.SchemeRDMA, Host: "127.0.0.1"}
	ram := []transport.RAMBlock{{Name: "pc.ram", Mem: mapMem(t, 1<<20)}}
	if _, err := (&transport.Config{RDMAProvider: "soft"}).Listen(ctx, a); err == nil || !strings.Contains(err.Error(), "no guest RAM") {
		t.Errorf("Listen without RAM: %v", err)
	}
	if _, err := (&transport.Config{RDMAProvider: "soft"}).Dial(ctx, a); err == nil || !strings.Contains(err.Error(), "no guest RAM") {
		t.Errorf("Dial without RAM: %v", err)
	}
	var pe *ProviderError
	if _, err := (&transport.Config{RDMAProvider: "rxe", RAM: ram}).Listen(ctx, a); !errors.As(err, &pe) || pe.Name != "rxe" {
		t.Errorf("unknown provider: %v", err)
	}
	if _, err := Open(ctx, "verbs"); err == nil {
		t.Skip("an RDMA device is present here")
	}
	for _, c := range []*transport.Config{{RAM: ram}, {RDMAProvider: "verbs", RAM: ram}} {
		_, err := c.Listen(ctx, a)
		if !errors.As(err, &pe) || pe.Name != "verbs" || !(errors.Is(err, verbs.ErrNoDevice) || errors.Is(err, ibv.ErrNotBuilt)) {
			t.Errorf("provider %q: %v; want verbs' own failure, no fallback", c.RDMAProvider, err)
		}
	}
}

// Example_transport opens an rdma: channel the way migctl's engine and
// loader do, through package transport, on the software provider.
func Example_transport() {
	ctx := context.Background()
	guestDst := make([]byte, 2<<20) // the destination guest's RAM (mmap'd in real use)
	guestSrc := make([]byte, 2<<20)
	copy(guestSrc[4096:], "hello")

	dcfg := &transport.Config{RDMAProvider: "soft", RAM: []transport.RAMBlock{{Name: "pc.ram", Mem: guestDst}}}
	l, err := dcfg.Listen(ctx, transport.Addr{Scheme: transport.SchemeRDMA, Host: "127.0.0.1"})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer l.Close()
	done := make(chan string, 1)
	go func() {
		c, err := l.Accept(ctx)
		if err != nil {
			done <- err.Error()
			return
		}
		defer c.Close()
		d := c.(*DestConn)
		_ = d.OpenRAM() // the source is accepted: let it write
		buf := make([]byte, 3)
		_, err = io.ReadFull(d, buf)
		done <- fmt.Sprintf("%s %q %v", buf, guestDst[4096:4101], err)
	}()

	scfg := &transport.Config{RDMAProvider: "soft", PinRAM: true, RAM: []transport.RAMBlock{{Name: "pc.ram", Mem: guestSrc}}}
	c, err := scfg.Dial(ctx, l.Addr())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer c.Close()
	s := c.(*SourceConn)
	_ = s.WriteRAM(ctx, "pc.ram", 4096, guestSrc[4096:8192]) // one-sided, into guestDst
	_, _ = s.Write([]byte("EOS"))                            // the stream; the write above lands first
	fmt.Println(<-done, s.Provider(), s.PinnedRAM())
	// Output: EOS "hello" <nil> soft true
}
