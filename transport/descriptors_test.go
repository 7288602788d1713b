package transport

import (
	"context"
	"errors"
	"io"
	"os"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// table is a Descriptors holding files by the key an fd: address gives.
type table struct {
	files map[string]*os.File
	taken []string
}

func (tb *table) TakeFD(a Addr) (*os.File, error) {
	key := a.FDName
	if key == "" {
		key = strconv.Itoa(a.FD)
	}
	f, ok := tb.files[key]
	if !ok {
		return nil, errors.New("File descriptor named '" + key + "' has not been found")
	}
	delete(tb.files, key)
	tb.taken = append(tb.taken, key)
	return f, nil
}

// With Config.Descriptors, fd: addresses come from the caller's table:
// names and numbers are keys there, the file taken is closed by the
// transport (the channel works on a duplicate), and no descriptor is taken
// from the process by number.
func TestDescriptors(t *testing.T) {
	ctx := context.Background()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	tb := &table{files: map[string]*os.File{"in": r, "out": w}}
	cfg := Config{Descriptors: tb}
	src, err := cfg.Dial(ctx, mustParse(t, "fd:out"))
	if err != nil {
		t.Fatal(err)
	}
	l, err := cfg.Listen(ctx, mustParse(t, "fd:in"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	dst, err := l.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	if err := w.Close(); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("the taken file was not closed by Dial: %v", err)
	}
	if err := r.Close(); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("the taken file was not closed by Listen: %v", err)
	}
	go func() { src.Write([]byte("hello")); src.Close() }()
	got, err := io.ReadAll(dst)
	if err != nil || string(got) != "hello" {
		t.Fatalf("read %q, %v", got, err)
	}
	if strings.Join(tb.taken, ",") != "out,in" {
		t.Fatalf("taken %v", tb.taken)
	}

	// A second use of a name finds nothing: it was taken.
	if _, err := cfg.Dial(ctx, mustParse(t, "fd:out")); err == nil || !strings.Contains(err.Error(), "File descriptor named 'out' has not been found") {
		t.Fatalf("second dial of a taken name: %v", err)
	}
	// A number the table does not hold is refused, even though the
	// process has that descriptor open: it is not taken.
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	if _, err := cfg.Dial(ctx, mustParse(t, "fd:"+strconv.Itoa(p[1]))); err == nil || !strings.Contains(err.Error(), "has not been found") {
		t.Fatalf("dial of a number outside the table: %v", err)
	}
	if _, err := cfg.Listen(ctx, mustParse(t, "fd:"+strconv.Itoa(p[0]))); err == nil {
		t.Fatal("listen on a number outside the table was accepted")
	}
	if !fdOpen(p[0]) || !fdOpen(p[1]) {
		t.Fatal("a refused fd:N closed the process's descriptor")
	}
	// A number the table holds is used, and closed after.
	r2, w2, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	tb.files["7"] = w2
	c, err := cfg.Dial(ctx, mustParse(t, "fd:7"))
	if err != nil {
		t.Fatal(err)
	}
	if err := w2.Close(); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("the numbered file was not closed: %v", err)
	}
	c.Close()
}
