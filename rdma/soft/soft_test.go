package soft

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/migctl/migctl/rdma/verbs"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// connPair returns an established active (a) and passive (b) connection.
// before runs on both before the connection is established (post receives).
func connPair(t *testing.T, before func(a, b verbs.Conn)) (verbs.Conn, verbs.Conn) {
	t.Helper()
	ctx := ctxT(t)
	p := New(Options{})
	l, err := p.Listen(ctx, "127.0.0.1:0", verbs.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	a, err := p.Resolve(ctx, l.Addr().String(), verbs.Config{SendDepth: 8, RecvDepth: 8})
	if err != nil {
		t.Fatal(err)
	}
	bc := make(chan verbs.Conn, 1)
	go func() {
		b, err := l.Next(ctx)
		if err != nil {
			bc <- nil
			return
		}
		if !bytes.Equal(b.PeerData(), []byte("hi")) {
			t.Errorf("private data %q", b.PeerData())
		}
		bc <- b
	}()
	// Connect blocks until b accepts, so run it after b is known.
	errc := make(chan error, 1)
	var reply []byte
	go func() {
		var err error
		reply, err = a.Connect(ctx, []byte("hi"))
		errc <- err
	}()
	b := <-bc
	if b == nil {
		t.Fatal("no connection request")
	}
	if before != nil {
		before(a, b)
	}
	if err := b.Accept(ctx, []byte("ho")); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil || string(reply) != "ho" {
		t.Fatalf("connect: %q %v", reply, err)
	}
	t.Cleanup(func() { _ = a.Close(); _ = b.Close() })
	return a, b
}

func wait1(t *testing.T, c verbs.Conn) verbs.Completion {
	t.Helper()
	wc := make([]verbs.Completion, 1)
	for {
		if c.CQ().Poll(wc) == 1 {
			return wc[0]
		}
		if err := c.CQ().Wait(ctxT(t)); err != nil {
			t.Fatal(err)
		}
		if c.CQ().Poll(wc) == 1 {
			return wc[0]
		}
		if err := c.QP().Err(); err != nil {
			t.Fatalf("no completion; QP error %v", err)
		}
	}
}

func reg(t *testing.T, c verbs.Conn, b []byte, acc verbs.Access) verbs.MR {
	mr, err := c.PD().Register(b, acc)
	if err != nil {
		t.Fatal(err)
	}
	return mr
}

func TestWriteThenSendArrivesInOrder(t *testing.T) {
	target := make([]byte, 3<<20)
	inbox := make([]byte, 64)
	var tmr, imr verbs.MR
	a, b := connPair(t, func(a, b verbs.Conn) {
		tmr = reg(t, b, target, verbs.AccessRemoteWrite)
		imr = reg(t, b, inbox, verbs.AccessLocalWrite)
		if err := b.QP().PostRecv(verbs.RecvWR{ID: 7, Local: verbs.SGE{Addr: imr.Addr(), Length: 64, LKey: imr.LKey()}}); err != nil {
			t.Fatal(err)
		}
	})
	src := bytes.Repeat([]byte{1, 2, 3, 4, 5}, 600000)
	msg := []byte("after the write")
	smr := reg(t, a, src, 0)
	mmr := reg(t, a, msg, 0)
	if err := a.QP().PostSend(verbs.SendWR{ID: 1, Op: verbs.OpWrite, Local: verbs.SGE{Addr: smr.Addr(), Length: uint32(len(src)), LKey: smr.LKey()},
		RemoteAddr: tmr.Addr() + 4096, RKey: tmr.RKey()}); err != nil {
		t.Fatal(err)
	}
	if err := a.QP().PostSend(verbs.SendWR{ID: 2, Op: verbs.OpSend, Local: verbs.SGE{Addr: mmr.Addr(), Length: uint32(len(msg)), LKey: mmr.LKey()}}); err != nil {
		t.Fatal(err)
	}
	wc := wait1(t, b)
	if wc.ID != 7 || wc.Status != verbs.StatusSuccess || wc.ByteLen != uint32(len(msg)) || !bytes.Equal(inbox[:wc.ByteLen], msg) {
		t.Fatalf("receive %+v %q", wc, inbox[:wc.ByteLen])
	}
	// The receive completed, so the earlier WRITE is in place.
	if !bytes.Equal(target[4096:4096+len(src)], src) || target[4095] != 0 {
		t.Fatal("the WRITE had not landed when the SEND after it was received")
	}
	for _, id := range []uint64{1, 2} {
		if wc := wait1(t, a); wc.ID != id || wc.Status != verbs.StatusSuccess {
			t.Fatalf("send completion %+v, want id %d success (in posting order)", wc, id)
		}
	}
}

func TestRefusedWrites(t *testing.T) {
	cases := []struct {
		name   string
		access verbs.Access
		dereg  bool
		off    uint64
		n      uint32
		reason string
	}{
		{"past the end", verbs.AccessRemoteWrite, false, 1<<20 - 100, 200, "outside the registered region"},
		{"no remote write", verbs.AccessLocalWrite, false, 0, 10, "does not allow remote writes"},
		{"stale key", verbs.AccessRemoteWrite, true, 0, 10, "no region is registered under this key"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			target := make([]byte, 1<<20)
			var tmr verbs.MR
			a, b := connPair(t, func(a, b verbs.Conn) { tmr = reg(t, b, target, c.access) })
			if c.dereg {
				if err := tmr.Deregister(); err != nil {
					t.Fatal(err)
				}
			}
			src := bytes.Repeat([]byte{9}, int(c.n))
			smr := reg(t, a, src, 0)
			if err := a.QP().PostSend(verbs.SendWR{ID: 1, Op: verbs.OpWrite, Local: verbs.SGE{Addr: smr.Addr(), Length: c.n, LKey: smr.LKey()},
				RemoteAddr: tmr.Addr() + c.off, RKey: tmr.RKey()}); err != nil {
				t.Fatal(err)
			}
			wc := wait1(t, a)
			var ae *verbs.AccessError
			if wc.Status != verbs.StatusRemoteAccess || !errors.As(wc.Err, &ae) || !ae.Remote || !bytes.Contains([]byte(ae.Reason), []byte(c.reason)) {
				t.Fatalf("writer completion %+v; want a remote access error saying %q", wc, c.reason)
			}
			for _, side := range []verbs.Conn{a, b} {
				waitErr(t, side)
				if !errors.Is(side.QP().Err(), verbs.ErrRemoteAccess) {
					t.Errorf("QP error %v; want ErrRemoteAccess on both sides", side.QP().Err())
				}
			}
			if !bytes.Equal(target, make([]byte, len(target))) {
				t.Error("a refused write changed the target memory")
			}
		})
	}
}

// waitErr waits until c's QP is in the error state.
func waitErr(t *testing.T, c verbs.Conn) {
	t.Helper()
	for c.QP().Err() == nil {
		if err := c.CQ().Wait(ctxT(t)); err != nil {
			t.Fatal(err)
		}
		c.CQ().Poll(make([]verbs.Completion, 16))
	}
}

func TestSendWithoutReceive(t *testing.T) {
	a, b := connPair(t, nil)
	msg := []byte("x")
	mmr := reg(t, a, msg, 0)
	if err := a.QP().PostSend(verbs.SendWR{ID: 1, Op: verbs.OpSend, Local: verbs.SGE{Addr: mmr.Addr(), Length: 1, LKey: mmr.LKey()}}); err != nil {
		t.Fatal(err)
	}
	if wc := wait1(t, a); wc.Status != verbs.StatusRNR || !errors.Is(wc.Err, verbs.ErrRNR) {
		t.Fatalf("completion %+v; want receiver not ready", wc)
	}
	waitErr(t, b)
	if !errors.Is(b.QP().Err(), verbs.ErrRNR) {
		t.Fatalf("receiver QP error %v", b.QP().Err())
	}
}

func TestSendTooLong(t *testing.T) {
	inbox := make([]byte, 4)
	a, b := connPair(t, func(a, b verbs.Conn) {
		imr := reg(t, b, inbox, verbs.AccessLocalWrite)
		_ = b.QP().PostRecv(verbs.RecvWR{ID: 3, Local: verbs.SGE{Addr: imr.Addr(), Length: 4, LKey: imr.LKey()}})
	})
	msg := []byte("too long")
	mmr := reg(t, a, msg, 0)
	_ = a.QP().PostSend(verbs.SendWR{ID: 1, Op: verbs.OpSend, Local: verbs.SGE{Addr: mmr.Addr(), Length: uint32(len(msg)), LKey: mmr.LKey()}})
	if wc := wait1(t, b); wc.ID != 3 || wc.Status != verbs.StatusLocalLength {
		t.Fatalf("receiver completion %+v; want a local length error", wc)
	}
	if wc := wait1(t, a); wc.Status != verbs.StatusRemoteInvalid {
		t.Fatalf("sender completion %+v; want remote invalid request", wc)
	}
}

func TestLocalProtection(t *testing.T) {
	a, _ := connPair(t, nil)
	buf := make([]byte, 16)
	mr := reg(t, a, buf, 0)
	_ = a.QP().PostSend(verbs.SendWR{ID: 1, Op: verbs.OpSend, Local: verbs.SGE{Addr: mr.Addr() + 8, Length: 16, LKey: mr.LKey()}})
	if wc := wait1(t, a); wc.Status != verbs.StatusLocalProt || !errors.Is(wc.Err, verbs.ErrLocalProtection) {
		t.Fatalf("completion %+v; want a local protection error", wc)
	}
}

func TestOrderlyCloseAndFlush(t *testing.T) {
	inbox := make([]byte, 8)
	a, b := connPair(t, func(a, b verbs.Conn) {
		imr := reg(t, b, inbox, verbs.AccessLocalWrite)
		_ = b.QP().PostRecv(verbs.RecvWR{ID: 5, Local: verbs.SGE{Addr: imr.Addr(), Length: 8, LKey: imr.LKey()}})
	})
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	wc := wait1(t, b)
	if wc.ID != 5 || wc.Status != verbs.StatusFlushed || !errors.Is(wc.Err, verbs.ErrDisconnected) {
		t.Fatalf("receive %+v; want flushed by an orderly disconnect", wc)
	}
	// Posting to a QP in error completes at once, flushed.
	_ = b.QP().PostRecv(verbs.RecvWR{ID: 6, Local: verbs.SGE{}})
	if wc := wait1(t, b); wc.ID != 6 || wc.Status != verbs.StatusFlushed {
		t.Fatalf("post after error: %+v", wc)
	}
}

func TestPostSendBeforeConnect(t *testing.T) {
	ctx := ctxT(t)
	p := New(Options{})
	l, err := p.Listen(ctx, "127.0.0.1:0", verbs.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	a, err := p.Resolve(ctx, l.Addr().String(), verbs.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if err := a.QP().PostSend(verbs.SendWR{Op: verbs.OpSend}); !errors.Is(err, verbs.ErrNotConnected) {
		t.Fatalf("PostSend before Connect: %v", err)
	}
}

func TestReject(t *testing.T) {
	ctx := ctxT(t)
	p := New(Options{})
	l, err := p.Listen(ctx, "[::1]:0", verbs.Config{})
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	defer l.Close()
	go func() {
		if b, err := l.Next(ctx); err == nil {
			_ = b.Reject(ctx, "version 9 unknown")
		}
	}()
	a, err := p.Resolve(ctx, l.Addr().String(), verbs.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	_, err = a.Connect(ctx, nil)
	var re *verbs.RejectedError
	if !errors.As(err, &re) || re.Reason != "version 9 unknown" {
		t.Fatalf("Connect: %v; want the rejection", err)
	}
}

func TestCancelBlockingWaits(t *testing.T) {
	p := New(Options{})
	l, err := p.Listen(ctxT(t), "127.0.0.1:0", verbs.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()

	t.Run("Next", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() { _, err := l.Next(ctx); errc <- err }()
		cancel()
		if err := <-errc; !errors.Is(err, context.Canceled) {
			t.Fatalf("Next: %v", err)
		}
	})
	t.Run("Connect", func(t *testing.T) {
		raw, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		ctx, cancel := context.WithCancel(context.Background())
		go func() {
			if c, err := raw.Accept(); err == nil {
				_, _ = io.ReadFull(c, make([]byte, 8)) // the request arrived; never answer
				cancel()
				_, _ = io.Copy(io.Discard, c)
				_ = c.Close()
			}
		}()
		a, err := p.Resolve(ctx, raw.Addr().String(), verbs.Config{})
		if err != nil {
			t.Fatal(err)
		}
		defer a.Close()
		if _, err := a.Connect(ctx, nil); !errors.Is(err, context.Canceled) {
			t.Fatalf("Connect: %v", err)
		}
	})
	t.Run("CQ.Wait", func(t *testing.T) {
		a, _ := connPair(t, nil)
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() { errc <- a.CQ().Wait(ctx) }()
		cancel()
		if err := <-errc; !errors.Is(err, context.Canceled) {
			t.Fatalf("Wait: %v", err)
		}
	})
}
