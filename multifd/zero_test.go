package multifd

import (
	"context"
	"errors"
	"runtime"
	"testing"
	"time"

	"github.com/migctl/migctl/stream"
)

// The table of Classify's doc, from QEMU's ram_save_target_page (>= 9.0):
// with multifd on, only legacy tests on the main thread; with multifd off
// the main thread calls save_zero_page, which tests unless the mode is none.
func TestClassify(t *testing.T) {
	for _, c := range []struct {
		mode    ZeroPageDetection
		multifd bool
		zero    bool
		want    Route
		tested  bool
	}{
		{ZeroLegacy, false, true, RouteMainZero, true},
		{ZeroLegacy, false, false, RouteMainPage, true},
		{ZeroLegacy, true, true, RouteMainZero, true},
		{ZeroLegacy, true, false, RouteMultifd, true},
		{ZeroNone, false, true, RouteMainPage, false},
		{ZeroNone, true, true, RouteMultifd, false},
		{ZeroMultifd, false, true, RouteMainZero, true},
		{ZeroMultifd, false, false, RouteMainPage, true},
		{ZeroMultifd, true, true, RouteMultifd, false},
	} {
		tested := false
		got := Classify(c.mode, c.multifd, func() bool { tested = true; return c.zero })
		if got != c.want || tested != c.tested {
			t.Errorf("%v multifd=%v zero=%v: %v (tested %v), want %v (tested %v)", c.mode, c.multifd, c.zero, got, tested, c.want, c.tested)
		}
	}
	for _, s := range []string{"none", "legacy", "multifd"} {
		z, err := ParseZeroPageDetection(s)
		if err != nil || z.String() != s {
			t.Errorf("%q: %v %v", s, z, err)
		}
	}
	if _, err := ParseZeroPageDetection("auto"); err == nil {
		t.Error("auto accepted")
	}
}

// QEMU's multifd_send_zero_page_detect on the batch [N0 Z1 Z2 N3 Z4 N5]
// (N normal, Z zero, by offset index), traced by hand:
//
//	i=0 N -> i=1
//	i=1 Z swap(1,5) [N0 N5 Z2 N3 Z4 Z1] j=4
//	i=1 N -> i=2
//	i=2 Z swap(2,4) [N0 N5 Z4 N3 Z2 Z1] j=3
//	i=2 Z swap(2,3) [N0 N5 N3 Z4 Z2 Z1] j=2
//	i=2 > j: normal = 3
func TestPartitionOrder(t *testing.T) {
	zero := []bool{false, true, true, false, true, false}
	offs := make([]uint64, len(zero))
	pages := make([][]byte, len(zero))
	for i, z := range zero {
		offs[i] = uint64(i) * testPS
		pages[i] = make([]byte, testPS)
		if !z {
			pages[i][testPS-1] = byte(i + 1)
		}
	}
	n := Partition(offs, pages, IsZero)
	want := []uint64{0, 5 * testPS, 3 * testPS, 4 * testPS, 2 * testPS, 1 * testPS}
	if n != 3 || !equalU64(offs, want) {
		t.Fatalf("normal %d, offsets %x; want 3, %x", n, offs, want)
	}
	for i, o := range offs {
		if IsZero(pages[i]) != zero[o/testPS] {
			t.Fatalf("page %d no longer follows offset %#x", i, o)
		}
	}
}

func TestIsZero(t *testing.T) {
	for _, size := range []int{0, 1, 31, 32, 33, 4096} {
		p := make([]byte, size)
		if !IsZero(p) {
			t.Fatalf("zero page of %d bytes", size)
		}
		for i := range size {
			p[i] = 1
			if IsZero(p) {
				t.Fatalf("byte %d of %d set, still zero", i, size)
			}
			p[i] = 0
		}
	}
}

func TestIsSyncPoint(t *testing.T) {
	for _, c := range []struct {
		m    FlushMode
		k    stream.Kind
		want bool
	}{
		{FlushPerPass, stream.KindFlush, true},
		{FlushPerPass, stream.KindEOS, false},
		{FlushPerSection, stream.KindFlush, false},
		{FlushPerSection, stream.KindEOS, true},
		{FlushPerPass, stream.KindPage, false},
		{FlushPerSection, stream.KindZero, false},
	} {
		if got := IsSyncPoint(c.m, c.k); got != c.want {
			t.Errorf("%v %v: %v", c.m, c.k, got)
		}
	}
}

// waitArrived polls (yielding, not sleeping) until k channels wait at s.
func waitArrived(ctx context.Context, t *testing.T, s *RecvSync, k int) {
	t.Helper()
	for {
		s.mu.Lock()
		a := s.arrived
		s.mu.Unlock()
		if a == k {
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("%d channels arrived, want %d", a, k)
		}
		runtime.Gosched()
	}
}

// The barrier holds every channel until all arrived and the main thread
// waited; a second round works the same; waits end with their context.
func TestRecvSync(t *testing.T) {
	const n = 3
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s := NewRecvSync(n)
	for round := range 2 {
		released := make(chan int, n)
		for ch := range n - 1 {
			go func() {
				if err := s.Arrive(ctx, ch); err != nil {
					t.Error(err)
				}
				released <- ch
			}()
		}
		waitArrived(ctx, t, s, n-1)
		// With n-1 arrivals the main thread cannot pass and nobody is released.
		s.mu.Lock()
		full := s.full
		s.mu.Unlock()
		select {
		case <-full:
			t.Fatalf("round %d: barrier full with %d of %d channels", round, n-1, n)
		case ch := <-released:
			t.Fatalf("round %d: channel %d released before the barrier", round, ch)
		default:
		}
		cctx, ccancel := context.WithCancel(ctx)
		ccancel()
		if err := s.Wait(cctx); !errors.Is(err, context.Canceled) {
			t.Fatalf("round %d: Wait with %d of %d arrived: %v", round, n-1, n, err)
		}
		go func() {
			if err := s.Arrive(ctx, n-1); err != nil {
				t.Error(err)
			}
			released <- n - 1
		}()
		if err := s.Wait(ctx); err != nil {
			t.Fatal(err)
		}
		for range n {
			<-released
		}
	}
	// A channel waiting while the main thread never comes: its context ends it.
	short, c3 := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- s.Arrive(short, 0) }()
	waitArrived(ctx, t, s, 1)
	c3()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Arrive: %v", err)
	}
	// More sync packets than channels in one round is a protocol error.
	s3 := NewRecvSync(1)
	c4, cancel4 := context.WithCancel(ctx)
	defer cancel4()
	go func() { _ = s3.Arrive(c4, 0) }()
	waitArrived(ctx, t, s3, 1)
	if err := s3.Arrive(ctx, 0); err == nil {
		t.Fatal("second sync from one round accepted")
	}
}
