//go:build mutant_no_contract

package mutant

func init() { NoContract = true }
