package transport_test

import (
	"fmt"
	"os"
	"strconv"

	"github.com/migctl/migctl/transport"
)

// An fd: endpoint has the properties of what its descriptor is: a regular
// file is seekable and takes extra descriptors (as file: does), so the
// rules let mapped-ram use it. Schemes with fixed properties are not
// probed: the spec declares them.
func ExampleProbe() {
	f, _ := os.CreateTemp("", "probe-*.mig")
	defer os.Remove(f.Name())
	defer f.Close()
	a, _ := transport.Parse("fd:" + strconv.Itoa(int(f.Fd())))
	props, ok, err := transport.Probe(a)
	fmt.Println(ok, err, props.Map()["seekable"], props.Map()["extra-fds"], props.Map()["return-path"])
	tcp, _ := transport.Parse("tcp:127.0.0.1:4444")
	_, ok, _ = transport.Probe(tcp)
	fmt.Println(ok)
	// Output:
	// true <nil> true true false
	// false
}
