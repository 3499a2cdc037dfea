package api

import "github.com/gofiber/fiber/v2"

// KeyChainService is what the /key-chain routes need from appliance/keychain.
type KeyChainService interface{}

// mountKeyChains registers the /key-chain routes.
func (s *Server) mountKeyChains(app *fiber.App) {}
