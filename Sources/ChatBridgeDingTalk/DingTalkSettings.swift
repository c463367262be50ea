import Foundation

/// Credentials and limits for one DingTalk robot.
public struct DingTalkSettings: Sendable, Equatable {
    /// AppKey / Client ID.
    public var clientID: String
    /// AppSecret / Client Secret: signs callbacks and obtains access tokens.
    public var clientSecret: String
    /// Robot code; for enterprise-internal apps the same as the client id. A message addressed to another
    /// robot code is refused.
    public var robotCode: String
    /// When set, a message whose `chatbotCorpId` differs is refused.
    public var corpID: String?
    public var apiBaseURL: String
    /// Hosts a sessionWebhook may point at. Any other URL is never requested.
    public var webhookHosts: [String]
    public var maxMessageChars: Int

    /// The only path a sessionWebhook may have.
    public static let webhookPath = "/robot/sendBySession"

    public init(
        clientID: String = "", clientSecret: String = "", robotCode: String? = nil, corpID: String? = nil,
        apiBaseURL: String = "https://api.dingtalk.com",
        webhookHosts: [String] = ["oapi.dingtalk.com", "api.dingtalk.com"], maxMessageChars: Int = 4000
    ) {
        self.clientID = clientID
        self.clientSecret = clientSecret
        self.robotCode = (robotCode?.isEmpty == false ? robotCode! : clientID)
        self.corpID = corpID?.isEmpty == false ? corpID : nil
        self.apiBaseURL = apiBaseURL
        self.webhookHosts = webhookHosts
        self.maxMessageChars = maxMessageChars
    }

    /// Whether the OpenAPI can be used (access token and robot sends).
    public var hasOpenAPICredentials: Bool { !clientID.isEmpty && !clientSecret.isEmpty }

    /// What is missing before HTTP callbacks can be verified, or nil when nothing is.
    public var callbackConfigurationProblem: String? {
        if clientSecret.isEmpty {
            return "DingTalk is not configured: set dingtalk.client_secret (CHATBRIDGE_DINGTALK_CLIENT_SECRET) to the robot's AppSecret"
        }
        if robotCode.isEmpty {
            return "DingTalk is not configured: set dingtalk.client_id (CHATBRIDGE_DINGTALK_CLIENT_ID) to the robot's AppKey, so messages for other robots are refused"
        }
        return nil
    }

    /// Whether a sessionWebhook URL may be requested: the documented form only — https to a listed host
    /// (plain http only to a listed loopback host, for local testing), path `/robot/sendBySession`, no
    /// credentials in the URL.
    public func allowsWebhook(_ url: String) -> Bool {
        guard let components = URLComponents(string: url), let scheme = components.scheme?.lowercased(),
            let host = components.host?.lowercased(), !host.isEmpty, components.user == nil, components.password == nil,
            components.percentEncodedPath == Self.webhookPath, components.fragment == nil
        else { return false }
        let listed = webhookHosts.contains { $0.lowercased() == host }
        guard listed else { return false }
        switch scheme {
        case "https": return true
        case "http": return ["127.0.0.1", "localhost", "::1", "[::1]"].contains(host)
        default: return false
        }
    }
}
