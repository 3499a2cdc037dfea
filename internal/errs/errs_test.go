package errs_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/kmsgate/kmsgate/internal/errs"
)

func TestKindIsTheSentinelThroughWrapping(t *testing.T) {
	base := errs.Errorf(errs.NotFound, "key %q not found", "k1")
	wrapped := fmt.Errorf("keys: sign: %w", fmt.Errorf("provider: %w", base))
	if !errors.Is(wrapped, errs.NotFound) {
		t.Fatal("errors.Is(wrapped, NotFound) = false")
	}
	for _, other := range []errs.Kind{errs.Internal, errs.BadInput, errs.Unavailable, errs.Conflict} {
		if errors.Is(wrapped, other) {
			t.Errorf("errors.Is(NotFound error, %v) = true", other)
		}
	}
	// The cause stays reachable for errors.Is/As too.
	cause := errors.New("CKR_DEVICE_ERROR")
	w := fmt.Errorf("ctx: %w", errs.Wrap(errs.Unavailable, cause, "HSM unavailable"))
	if !errors.Is(w, cause) || !errors.Is(w, errs.Unavailable) {
		t.Fatal("Wrap hides its cause or its kind")
	}
	if errors.Is(errors.New("not found"), errs.NotFound) {
		t.Fatal("an unclassified error matched a kind")
	}
}

func TestKindOf(t *testing.T) {
	for _, c := range []struct {
		err  error
		want errs.Kind
	}{
		{errs.Forbidden, errs.Forbidden},                                      // a bare Kind
		{fmt.Errorf("x: %w", errs.Throttled), errs.Throttled},                 // a wrapped bare Kind
		{fmt.Errorf("x: %w", errs.Errorf(errs.Conflict, "k")), errs.Conflict}, // a wrapped *Error
		{errors.New("plain"), errs.Internal},
		{nil, errs.Internal},
	} {
		if got := errs.KindOf(c.err); got != c.want {
			t.Errorf("KindOf(%v) = %v, want %v", c.err, got, c.want)
		}
	}
	if errs.Kind(99).String() != "internal" || errs.BadInput.String() != "bad_input" {
		t.Fatal("kind names")
	}
}

func TestPublicMessageNeverIncludesTheCause(t *testing.T) {
	cause := errors.New("vault: permission denied for token hvs.SECRET")
	e := errs.Wrap(errs.Unavailable, cause, "backend unavailable")
	e.Op, e.Provider = "sign", "main-vault"
	w := fmt.Errorf("outer: %w", e)
	pub := errs.PublicMessage(w)
	if pub != "sign: backend unavailable" {
		t.Fatalf("PublicMessage = %q", pub)
	}
	if strings.Contains(pub, "SECRET") || strings.Contains(pub, "permission denied") {
		t.Fatalf("PublicMessage leaks the cause: %q", pub)
	}
	// Error() is for logs and keeps everything.
	if s := e.Error(); !strings.Contains(s, "main-vault") || !strings.Contains(s, "permission denied") {
		t.Fatalf("Error() = %q, want provider and cause for the logs", s)
	}
	if got := errs.PublicMessage(errors.New("db password=hunter2")); got != "internal error" {
		t.Fatalf("PublicMessage of an unclassified error = %q", got)
	}
}

func TestCodeAndRetryAfter(t *testing.T) {
	e := errs.Errorf(errs.BadInput, "bad kid").WithCode("invalid_kid")
	if got := errs.CodeOf(fmt.Errorf("w: %w", e)); got != "invalid_kid" {
		t.Fatalf("CodeOf = %q", got)
	}
	if errs.CodeOf(errs.Errorf(errs.BadInput, "x")) != "" || errs.CodeOf(errors.New("x")) != "" || errs.CodeOf(errs.NotFound) != "" {
		t.Fatal("CodeOf invents a code")
	}
	th := &errs.Error{Kind: errs.Throttled, Msg: "slow down", RetryAfter: 3 * time.Second}
	if got := errs.RetryAfterOf(fmt.Errorf("w: %w", th)); got != 3*time.Second {
		t.Fatalf("RetryAfterOf = %v", got)
	}
	if errs.RetryAfterOf(errors.New("x")) != 0 || errs.RetryAfterOf(errs.Throttled) != 0 {
		t.Fatal("RetryAfterOf invents a delay")
	}
}
