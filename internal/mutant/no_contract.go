//go:build mutant_no_contract

package mutant

func init() { NoContract = true; Active = append(Active, "mutant_no_contract") }
