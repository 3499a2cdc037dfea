package api

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/gofiber/fiber/v2"
)

// requireJSON answers 415 unless the request says its body is JSON.
func requireJSON(c *fiber.Ctx) error {
	ct := c.Get(fiber.HeaderContentType)
	if !strings.HasPrefix(strings.ToLower(strings.TrimSpace(ct)), fiber.MIMEApplicationJSON) {
		return problem(fiber.StatusUnsupportedMediaType, "unsupported_media_type", "Content-Type must be application/json")
	}
	return nil
}

// decodeJSON decodes the request body into v strictly: JSON content type, a single object, no
// unknown fields, no type mismatches. Each failure is a 4xx with its own code.
func decodeJSON(c *fiber.Ctx, v any) error {
	if err := requireJSON(c); err != nil {
		return err
	}
	body := c.Body()
	if len(bytes.TrimSpace(body)) == 0 {
		return problem(fiber.StatusBadRequest, "empty_body", "request body is empty")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return jsonProblem(err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return problem(fiber.StatusBadRequest, "invalid_json", "request body has data after the JSON object")
	}
	return nil
}

func jsonProblem(err error) error {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se), errors.Is(err, io.ErrUnexpectedEOF):
		return problem(fiber.StatusBadRequest, "invalid_json", "request body is not valid JSON")
	case errors.As(err, &te):
		field := te.Field
		if field == "" {
			return problem(fiber.StatusBadRequest, "invalid_type", fmt.Sprintf("request body must be a JSON object, not %s", te.Value))
		}
		return problem(fiber.StatusBadRequest, "invalid_type", fmt.Sprintf("field %q must be %s, not %s", field, jsonType(te.Type.Kind().String()), te.Value))
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return problem(fiber.StatusBadRequest, "unknown_field", strings.TrimPrefix(err.Error(), "json: "))
	}
	return problem(fiber.StatusBadRequest, "invalid_json", "request body is not valid JSON")
}

func jsonType(k string) string {
	switch k {
	case "string":
		return "a string"
	case "bool":
		return "a boolean"
	case "struct", "map":
		return "an object"
	case "slice", "array":
		return "an array"
	}
	return "a number"
}

var b64Encodings = [...]*base64.Encoding{base64.StdEncoding, base64.RawStdEncoding, base64.URLEncoding, base64.RawURLEncoding}

// decodeB64 accepts standard or URL-safe base64, padded or not: clients differ, and both
// alphabets are unambiguous.
func decodeB64(field string, s []byte) ([]byte, error) {
	for _, enc := range b64Encodings {
		dst := make([]byte, enc.DecodedLen(len(s)))
		if n, err := enc.Decode(dst, s); err == nil {
			return dst[:n], nil
		}
	}
	return nil, problem(fiber.StatusBadRequest, "invalid_base64", fmt.Sprintf("field %q is not valid base64", field))
}
