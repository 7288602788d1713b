package guest

import (
	"slices"
	"sync"
	"testing"

	"pgregory.net/rapid"
)

// TestBitmapModel checks every method against a map of set pages.
func TestBitmapModel(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		n := rapid.IntRange(1, 300).Draw(t, "n")
		b := NewBitmap(n)
		if len(b) != BitmapWords(n) {
			t.Fatalf("NewBitmap(%d) has %d words, want %d", n, len(b), BitmapWords(n))
		}
		model := map[int]bool{}
		page := rapid.IntRange(0, n-1)
		ops := rapid.IntRange(1, 60).Draw(t, "ops")
		for range ops {
			switch rapid.IntRange(0, 4).Draw(t, "op") {
			case 0:
				i := page.Draw(t, "set")
				b.Set(i)
				model[i] = true
			case 1:
				i := page.Draw(t, "clear")
				b.Clear(i)
				delete(model, i)
			case 2:
				i := page.Draw(t, "setatomic")
				b.SetAtomic(i)
				model[i] = true
			case 3:
				o := NewBitmap(n)
				for range rapid.IntRange(0, 5).Draw(t, "orn") {
					i := page.Draw(t, "or")
					o.Set(i)
					model[i] = true
				}
				b.Or(o)
			case 4:
				if rapid.Bool().Draw(t, "reset") {
					b.Reset()
					clear(model)
				}
			}
		}
		var want []int
		for i := range n {
			if b.Test(i) != model[i] {
				t.Fatalf("Test(%d) = %v, model says %v", i, b.Test(i), model[i])
			}
			if model[i] {
				want = append(want, i)
			}
		}
		if b.Count() != len(want) {
			t.Fatalf("Count = %d, want %d", b.Count(), len(want))
		}
		var got []int
		for p := b.Next(0); p >= 0; p = b.Next(p + 1) {
			got = append(got, p)
		}
		if !slices.Equal(got, want) {
			t.Fatalf("Next iteration = %v, want %v", got, want)
		}
		from := rapid.IntRange(-2, n+70).Draw(t, "from")
		wantNext := -1
		for _, p := range want {
			if p >= from {
				wantNext = p
				break
			}
		}
		if g := b.Next(from); g != wantNext {
			t.Fatalf("Next(%d) = %d, want %d", from, g, wantNext)
		}
	})
}

func TestBitmapBitOrder(t *testing.T) {
	b := NewBitmap(130)
	b.Set(0)
	b.Set(65)
	b.Set(129)
	if b[0] != 1 || b[1] != 1<<1 || b[2] != 1<<1 {
		t.Fatalf("words = %#x, want [0x1 0x2 0x2] (page p is bit p%%64 of word p/64)", []uint64(b))
	}
}

// TestBitmapDrainConcurrent: bits set by concurrent SetAtomic calls all end
// up in exactly one of the drained bitmaps or the final remainder.
func TestBitmapDrainConcurrent(t *testing.T) {
	const n, setters, per = 4096, 4, 5000
	shared := NewBitmap(n)
	want := NewBitmap(n)
	var wg sync.WaitGroup
	sets := make([][]int, setters)
	for s := range setters {
		rnd := wyrand(s + 1)
		for range per {
			i := int(rnd.below(n))
			sets[s] = append(sets[s], i)
			want.Set(i)
		}
	}
	done := make(chan struct{})
	for s := range setters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, i := range sets[s] {
				shared.SetAtomic(i)
			}
		}()
	}
	go func() { wg.Wait(); close(done) }()
	got := NewBitmap(n)
	drains := 0
	for running := true; running; {
		select {
		case <-done:
			running = false
		default:
		}
		shared.Drain(got)
		drains++
	}
	shared.Drain(got) // after the setters finished: the rest
	if !slices.Equal(got, want) {
		t.Fatalf("drained %d pages over %d drains, want %d", got.Count(), drains, want.Count())
	}
	if shared.Count() != 0 {
		t.Fatalf("shared bitmap not empty after Drain: %d pages", shared.Count())
	}
}
