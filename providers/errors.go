package providers

import (
	"fmt"

	"github.com/kmsgate/kmsgate/internal/errs"
)

// CheckES256 refuses every algorithm but ES256 ("" means the default, ES256) with a
// NotSupported error, so a provider never signs with a curve or hash the caller did not ask for.
func CheckES256(provider, op, alg string) error {
	if alg == "" || alg == ES256 {
		return nil
	}
	return &errs.Error{Kind: errs.NotSupported, Provider: provider, Op: op, Code: "unsupported_alg",
		Msg: fmt.Sprintf("algorithm %q is not supported (supported: ES256)", alg)}
}
