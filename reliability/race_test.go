//go:build race

package reliability

// raceEnabled: the tests run with -race, and migctl is built with it too.
const raceEnabled = true
