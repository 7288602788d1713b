package transport_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/migctl/migctl/transport"
)

// A one-way save: the stream goes to a temporary file next to PATH, and
// only Commit puts it in PATH's place. Had the program stopped (or called
// Close) before Commit, PATH would still hold the previous save.
func ExampleCommitter() {
	dir, err := os.MkdirTemp("", "example")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "guest.mig")
	os.WriteFile(path, []byte("previous save"), 0o600)

	ctx := context.Background()
	a, _ := transport.Parse("file:" + path)
	c, err := transport.Dial(ctx, a)
	if err != nil {
		panic(err)
	}
	defer c.Close() // aborts unless Commit succeeded
	fmt.Fprint(c, "new save")

	before, _ := os.ReadFile(path)
	fmt.Printf("before Commit: %q\n", before)
	if err := c.(transport.Committer).Commit(ctx); err != nil {
		fmt.Println(err) // wraps transport.ErrNotDurable: the save did not happen
		return
	}
	after, _ := os.ReadFile(path)
	fmt.Printf("after Commit: %q\n", after)
	// Output:
	// before Commit: "previous save"
	// after Commit: "new save"
}
