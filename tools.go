//go:build tools

package migctl

// Dependencies the design names but no package imports yet; keeps go.mod stable while packages land.
import (
	_ "github.com/cockroachdb/datadriven"
	_ "github.com/digitalocean/go-qemu/qmp"
	_ "github.com/go-playground/validator/v10"
	_ "github.com/qmuntal/stateless"
	_ "github.com/spf13/cobra"
	_ "github.com/vbauerster/mpb/v8"
	_ "go.uber.org/goleak"
	_ "go.yaml.in/yaml/v3"
	_ "golang.org/x/sys/unix"
	_ "pgregory.net/rapid"
)
