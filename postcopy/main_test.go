package postcopy

import (
	"os"
	"testing"

	"github.com/migctl/migctl/guest/proc"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	proc.Main() // spawned guest processes run here
	if spec := os.Getenv(attacherEnv); spec != "" {
		os.Exit(attacherMain(spec)) // a re-executed test binary playing a migctl that gets killed
	}
	goleak.VerifyTestMain(m)
}
