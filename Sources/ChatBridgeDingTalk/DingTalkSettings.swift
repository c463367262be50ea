import Foundation

/// Credentials and limits for one DingTalk robot.
public struct DingTalkSettings: Sendable, Equatable {
    /// AppKey / Client ID.
    public var clientID: String
    /// AppSecret / Client Secret: signs callbacks and obtains access tokens.
    public var clientSecret: String
    /// Robot code; for enterprise-internal apps the same as the client id.
    public var robotCode: String
    public var apiBaseURL: String
    /// Hosts a sessionWebhook may point at. Any other URL is never requested.
    public var webhookHosts: [String]
    public var maxMessageChars: Int

    public init(
        clientID: String = "", clientSecret: String = "", robotCode: String? = nil,
        apiBaseURL: String = "https://api.dingtalk.com",
        webhookHosts: [String] = ["oapi.dingtalk.com", "api.dingtalk.com"], maxMessageChars: Int = 4000
    ) {
        self.clientID = clientID
        self.clientSecret = clientSecret
        self.robotCode = (robotCode?.isEmpty == false ? robotCode! : clientID)
        self.apiBaseURL = apiBaseURL
        self.webhookHosts = webhookHosts
        self.maxMessageChars = maxMessageChars
    }

    /// Whether the OpenAPI can be used (access token and robot sends).
    public var hasOpenAPICredentials: Bool { !clientID.isEmpty && !clientSecret.isEmpty }

    /// Whether a sessionWebhook URL may be requested: https to a listed host, or plain http to a listed
    /// loopback host (local testing only).
    public func allowsWebhook(_ url: String) -> Bool {
        guard let components = URLComponents(string: url), let scheme = components.scheme?.lowercased(),
            let host = components.host?.lowercased(), !host.isEmpty, components.user == nil, components.password == nil
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
