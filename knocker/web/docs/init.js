// Swagger UI for Knocker's own /openapi.json. A separate file, not an inline script, so the
// strict Content-Security-Policy of the knock page applies unchanged. validatorUrl: null
// keeps Swagger UI from sending the schema to its public validator.
"use strict";
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
  });
});
