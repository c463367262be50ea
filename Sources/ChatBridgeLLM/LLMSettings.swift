/// Which API dialect the model endpoint speaks.
public enum LLMProvider: String, Sendable, CaseIterable {
    /// OpenAI and every OpenAI-compatible server (DeepSeek, Qwen, Moonshot, Ollama, vLLM, …).
    case openai
    /// Azure OpenAI: `base_url` is the deployment URL, `api-version` query, `api-key` header.
    case azure
}

/// How to reach the model.
public struct LLMSettings: Sendable, Equatable {
    public var provider: LLMProvider
    /// `https://api.openai.com/v1`, or for Azure `https://RESOURCE.openai.azure.com/openai/deployments/DEPLOYMENT`.
    public var baseURL: String
    public var apiKey: String
    /// `llm.api_keys`: a pool for the default profile (``ModelProfile``); `apiKey` when empty.
    public var apiKeys: [String] = []
    public var model: String
    public var apiVersion: String
    public var temperature: Double?
    public var maxTokens: Int?
    /// Overall deadline for one answer, from request to last token.
    public var timeout: Duration

    public init(
        provider: LLMProvider = .openai, baseURL: String = "https://api.openai.com/v1", apiKey: String = "",
        model: String = "gpt-4o-mini", apiVersion: String = "2024-10-21", temperature: Double? = nil,
        maxTokens: Int? = nil, timeout: Duration = .seconds(120)
    ) {
        self.provider = provider
        self.baseURL = baseURL
        self.apiKey = apiKey
        self.model = model
        self.apiVersion = apiVersion
        self.temperature = temperature
        self.maxTokens = maxTokens
        self.timeout = timeout
    }

    /// The chat-completions URL for this provider.
    public var completionsURL: String {
        var base = baseURL
        while base.hasSuffix("/") { base.removeLast() }
        switch provider {
        case .openai:
            return base + "/chat/completions"
        case .azure:
            return base + "/chat/completions?api-version=" + apiVersion
        }
    }
}
